"""Several runs side by side: one training process per device (Table 1 on several GPUs).

`python -m samlib sweep --configs baseline,se,se_mixup,final --seeds 84,85 --devices
cuda:0,cuda:1,cuda:2,cuda:3 ...` keeps every device busy with one `samlib train` process
until the queue of config x seed jobs is empty.  Each job logs to <out>/logs/; finished
runs are reused, so a sweep interrupted half-way only trains what is missing.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch


def default_devices() -> list:
    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]


def sweep(configs, seeds, profile, data_dir, out="runs", devices=None, extra=()) -> list:
    """Run every config x seed; returns [(config, seed, device, returncode, log path)]."""
    devices = list(devices or default_devices())
    jobs = [(c, s) for c in configs for s in seeds]
    logs = Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running, results = {}, []
    while jobs or running:
        for slot in [i for i in range(len(devices)) if i not in running]:
            if not jobs:
                break
            device = devices[slot]
            config, seed = jobs.pop(0)
            log = logs / f"{config}-s{seed}.log".replace("+", "_").replace("=", "_")
            cmd = [sys.executable, "-m", "samlib", "train", "--config", config, "--seed", str(seed),
                   "--profile", profile, "--data-dir", str(data_dir), "--out", str(out),
                   "--device", device, "--no-progress", *extra]
            print(f"[{device}] {config} seed {seed} -> {log}", flush=True)
            running[slot] = (config, seed, log, subprocess.Popen(
                cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT))
        time.sleep(0.5)
        for slot, (config, seed, log, proc) in list(running.items()):
            device = devices[slot]
            if proc.poll() is not None:
                del running[slot]
                results.append((config, seed, device, proc.returncode, log))
                print(f"[{device}] {config} seed {seed} finished (exit {proc.returncode})", flush=True)
    return results
