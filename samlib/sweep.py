"""`python -m samlib sweep`: config x seed runs side by side, one `samlib train` process per device, each logging
to <out>/logs/; finished runs are reused, so an interrupted sweep only trains what is missing."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from .device import resolve_device


def job_env(devices: list, environ=None) -> dict:
    """The jobs' environment: CPU jobs share the cores, OMP_NUM_THREADS = cores // jobs each (unless set)."""
    env = dict(os.environ if environ is None else environ)
    on_cpu = sum(d == "cpu" for d in devices)
    if on_cpu > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // on_cpu))
    return env


def sweep(configs, seeds, profile, data_dir, out="runs", devices=None, extra=()) -> list:
    """Run every config x seed -> [(config, seed, device, returncode, log)], one job per `devices` entry at a time."""
    devices = devices or [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    devices = [str(resolve_device(d)) for d in devices]
    jobs = [(c, s) for c in configs for s in seeds]
    logs = Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = job_env(devices)
    running, results = {}, []
    try:
        while jobs or running:
            for slot in [i for i in range(len(devices)) if i not in running][:len(jobs)]:     # a free slot per job
                device = devices[slot]
                config, seed = jobs.pop(0)
                log = logs / f"{config}-s{seed}.log".replace("+", "_").replace("=", "_")
                cmd = [sys.executable, "-m", "samlib", "train", "--config", config, "--seed", str(seed),
                       "--profile", profile, "--data-dir", str(data_dir), "--out", str(out),
                       "--device", device, "--no-progress", *extra]
                print(f"[{device}] {config} seed {seed} -> {log}", flush=True)
                with open(log, "w") as handle:      # the child streams into its own copy
                    running[slot] = (config, seed, log, subprocess.Popen(
                        cmd, stdout=handle, stderr=subprocess.STDOUT, env=env))
            time.sleep(0.5)
            for slot, (config, seed, log, proc) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    results.append((config, seed, devices[slot], proc.returncode, log))
                    print(f"[{devices[slot]}] {config} seed {seed} finished (exit {proc.returncode})", flush=True)
    except BaseException:       # pass SIGTERM on to the jobs (each keeps its last good checkpoint) and wait
        procs = [entry[3] for entry in running.values()]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)       # a no-op for a job that has ended
        deadline = time.monotonic() + 60.0
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    return results
