"""Several runs side by side: one training process per device (Table 1 on several GPUs).

`python -m samlib sweep --configs baseline,se,se_mixup,final --seeds 84,85 --devices
cuda:0,cuda:1,cuda:2,cuda:3 ...` keeps every device busy with one `samlib train` process
until the queue of config x seed jobs is empty.  Each job logs to <out>/logs/; finished
runs are reused, so a sweep interrupted half-way only trains what is missing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from .device import resolve_device
from .errors import SamlibError


def default_devices() -> list:
    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]


def _open_log(path: Path):
    """The job's log file (the one thing written outside samlib.io: the child streams into it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w")
    except OSError as e:
        raise SamlibError(f"cannot write the sweep's log {path}: {e.strerror}; choose a writable "
                          "--out folder (logs go to <out>/logs/), then run the same command again") from None


def _stop(running: dict, grace: float = 60.0) -> None:
    """Interrupted: pass SIGTERM on to the jobs still running (each keeps its last good
    checkpoint and resumes when the sweep is run again) and wait for them."""
    procs = [entry[3] for entry in running.values()]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def job_env(devices: list, environ=None) -> dict:
    """The jobs' environment.  Several jobs on the CPU share its cores: each gets
    OMP_NUM_THREADS = cores // jobs (two single-threaded training processes on 2 cores train
    about 1.3x the images of one with 2 threads).  A value the user set is kept."""
    env = dict(os.environ if environ is None else environ)
    on_cpu = sum(d == "cpu" for d in devices)
    if on_cpu > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // on_cpu))
    return env


def sweep(configs, seeds, profile, data_dir, out="runs", devices=None, extra=()) -> list:
    """Run every config x seed; returns [(config, seed, device, returncode, log path)].

    Each device must be cpu, cuda or cuda:N (and present); a device may be listed twice to
    run two jobs on it.  If the sweep is interrupted (Ctrl-C, SIGTERM), the running jobs get
    SIGTERM too, so each stops with its last good checkpoint; rerunning resumes them."""
    devices = [str(resolve_device(d)) for d in (devices or default_devices())]
    jobs = [(c, s) for c in configs for s in seeds]
    logs = Path(out) / "logs"
    env = job_env(devices)
    running, results = {}, []
    try:
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
                with _open_log(log) as handle:      # the child holds its own copy
                    running[slot] = (config, seed, log, subprocess.Popen(
                        cmd, stdout=handle, stderr=subprocess.STDOUT, env=env))
            time.sleep(0.5)
            for slot, (config, seed, log, proc) in list(running.items()):
                device = devices[slot]
                if proc.poll() is not None:
                    del running[slot]
                    results.append((config, seed, device, proc.returncode, log))
                    print(f"[{device}] {config} seed {seed} finished (exit {proc.returncode})", flush=True)
    except BaseException:
        _stop(running)
        raise
    return results
