"""A run directory: where one config x seed keeps everything it writes.

`<config>-s<seed>-<hash of the resolved config>` holds config.json and run.json (written
first: what runs, on which data), metrics.csv, last.pt (+ last.prev.pt) for resuming,
best_regular.pt / best_ema.pt (the selected models), and once finished provenance.json
and final.json.  A finished run is reused, an unfinished one resumes from last.pt, and a
run trained on other data (run.json's fingerprint) is refused, never reused.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

import torch

from . import data as D
from . import dist
from .config import Config
from .errors import CheckpointError, SamlibError
from .io import atomic_write_text, load_checkpoint, read_json, save_checkpoint, write_json
from .model import build_model

try:
    import fcntl                      # POSIX; elsewhere runs are not locked
except ImportError:
    fcntl = None

METRIC_FIELDS = ("epoch", "lr", "mix_alpha", "train_loss", "train_acc_mixed", "train_acc_clean",
                 "val_acc", "val_acc_ema", "test_acc", "test_acc_ema", "nonfinite_steps", "seconds")


class RunDir:
    """Bookkeeping of one run: naming, reuse, resume, the data check, what each epoch saves."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, cfg: Config, out) -> "RunDir":
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name)
        return cls(Path(out) / f"{safe}-s{cfg.seed}-{cfg.hash()}")

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return (self / "final.json").exists()

    def check_data(self, data_id: str) -> None:
        """Refuse a run directory made from other data than `data_id` (a fingerprint)."""
        recorded = read_json(self / "run.json") if (self / "run.json").exists() else {}
        if recorded.get("data", data_id) != data_id:
            raise SamlibError(f"{self.path} was trained on other data (fingerprint {recorded['data']}, "
                              f"this data {data_id}); use another --out folder for this data")

    def start(self, cfg: Config, profile, data_id: str) -> None:
        """config.json and run.json (write_json makes the folder, or says why it cannot)."""
        if dist.is_main():
            write_json(self / "config.json", cfg.to_dict())
            write_json(self / "run.json", {"profile": profile, "config": cfg.name, "seed": cfg.seed,
                                           "hash": cfg.hash(), "data": data_id})

    def resume_state(self, device) -> dict | None:
        """The last epoch's full training state, or None for a new run."""
        if not ((self / "last.pt").exists() or (self / "last.prev.pt").exists()):
            return None
        try:
            return load_checkpoint(self / "last.pt", map_location=device)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume {self.path}: {e}; move that folder away (or delete "
                                  "it) to start the run again from scratch") from None

    def save_epoch(self, state: dict, metrics: list, best_models: dict) -> None:
        """The selected models (best_<kind>.pt), metrics.csv, then last.pt - in that order,
        so that a crash between them leaves a last.pt no newer than the rest."""
        if not dist.is_main():
            return
        for kind, model in best_models.items():
            save_checkpoint({"arch": model.arch, "model": model.state_dict(), "epoch": state["epoch"]},
                            self / f"best_{kind}.pt", keep_previous=False)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(metrics)
        atomic_write_text(self / "metrics.csv", buf.getvalue())
        save_checkpoint(state, self / "last.pt")

    def finish(self, final: dict, provenance: dict) -> None:
        """provenance.json, then final.json: its presence marks the run finished."""
        if dist.is_main():
            write_json(self / "provenance.json", provenance)
            write_json(self / "final.json", final)


    @contextlib.contextmanager
    def lock(self, wait: bool = False):
        """Hold the run's advisory lock (`.lock`) while training it: one writer per run.

        The operating system releases it when the process ends, crash or kill included.  A
        second trainer of the same run is refused (or, with `wait`, blocks until it is free).
        Only rank 0 of a data-parallel run locks: the other ranks never write.
        """
        if not dist.is_main() or fcntl is None:
            yield
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self / ".lock", "a+")
        except OSError as e:
            raise SamlibError(f"cannot write to {self.path}: {e.strerror}; choose a writable --out folder") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise SamlibError(f"{self.path} is being trained by {holder}; wait for it to finish "
                                  "(or pass --wait), or stop that process first") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- provenance

def provenance(device: torch.device, data_source: str) -> dict:
    """Commit, library versions, device and data: what every reported number names."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    import torchvision
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": describe_device(device),
        "data_source": data_source,
        "world_size": dist.world_size(),
    }


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def describe_data(dataset: D.CIFAR10, data_dir, data_id: str) -> str:
    """Provenance's data source: the report's label, the folder and the data fingerprint."""
    where = f"{data_dir}; " if data_dir is not None else ""
    return f"{D.describe_source(dataset, data_dir)} ({where}fingerprint {data_id})"


# ---------------------------------------------------------------- models from checkpoints

def check_arch(ckpt: dict, arch: dict) -> None:
    """Refuse a checkpoint whose recorded architecture is not `arch`."""
    def plain(a):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in a.items()}

    got = ckpt.get("arch")
    if got is not None and plain(got) != plain(arch):
        raise CheckpointError(f"{ckpt.get('_path', 'checkpoint')} holds a model with architecture "
                              f"{got}, not the expected {arch}; it belongs to another config")


def load_model(path, device="cpu", expect_arch: dict | None = None) -> torch.nn.Module:
    """Rebuild a model from a samlib checkpoint (weights_only load; architecture checked)."""
    ckpt = load_checkpoint(path, map_location=device)
    if expect_arch is not None:
        check_arch(ckpt, expect_arch)
    model = build_model(**ckpt["arch"]).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt['_path']} does not fit its recorded architecture: "
                              f"{str(e).splitlines()[0]}") from None
    return model.eval()


def load_run_models(run_dir, device="cpu"):
    """(regular, ema-or-None) from a run directory's best checkpoints."""
    run_dir = Path(run_dir)
    if not (run_dir / "best_regular.pt").exists():
        raise SamlibError(f"{run_dir} holds no best_regular.pt: is it a finished samlib run directory? "
                          "(python -m samlib train ... prints the run directory)")
    regular = load_model(run_dir / "best_regular.pt", device)
    ema_path = run_dir / "best_ema.pt"
    ema = load_model(ema_path, device, expect_arch=regular.arch) if ema_path.exists() else None
    return regular, ema
