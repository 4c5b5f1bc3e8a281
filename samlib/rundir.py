"""A run directory `<config>-s<seed>-<config hash>`: config, metrics.csv, last.pt to resume, best_<kind>.pt (the
selected models), final.json once finished.  A finished run is reused, an unfinished one resumes."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import platform
import re
import reprlib
import socket
import subprocess
import time
from pathlib import Path

import torch

from . import data as D
from . import dist
from .config import SPEED_KNOBS, Config, from_dict
from .device import cpu_has_native_bf16, cpu_model
from .errors import CheckpointError, ConfigError, SamlibError
from .io import (atomic_write_text, check_fields, check_tensors, load_checkpoint, present, read_json,
                 save_checkpoint, write_json)
from .model import NORM_STDS, SE_PLACEMENTS, build_model

try:
    import fcntl                      # POSIX; elsewhere runs are not locked
except ImportError:
    fcntl = None

METRIC_FIELDS = ("epoch", "lr", "mix_alpha", "train_loss", "train_acc_mixed", "train_acc_clean", "val_acc",
                 "val_acc_ema", "test_acc", "test_acc_ema", "nonfinite_steps", "skipped_steps", "seconds")


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
        path, fix = self / "run.json", f"move {self.path} away (or delete it) to train the run again from scratch"
        recorded = (check_fields(read_json(path, fix=fix), path, optional={"data": "text"}, fix=fix)
                    if present(path) else {})
        if recorded.get("data", data_id) != data_id:
            raise SamlibError(f"{self.path} was trained on other data (fingerprint {recorded['data']}, "
                              f"this data {data_id}); use another --out folder for this data")

    def start(self, cfg: Config, profile, data_id: str) -> None:
        """config.json and run.json (write_json makes the folder, or says why it cannot)."""
        if dist.is_main():
            write_json(self / "config.json", cfg.to_dict())
            write_json(self / "run.json", {"profile": profile, "config": cfg.name, "seed": cfg.seed,
                                           "hash": cfg.hash(), "data": data_id})

    def resume(self, cfg: Config, load) -> bool:
        """`load` last.pt (else last.prev.pt) read on the CPU; False for a new run.  A refusal: CheckpointError."""
        if not (present(self / "last.pt") or present(self / "last.prev.pt")):
            return False
        try:
            state = load_checkpoint(self / "last.pt", map_location="cpu")
            check_resume_state(state, cfg)
            load(state)
        except (CheckpointError, ConfigError) as e:
            raise CheckpointError(f"cannot resume {self.path}: {e}; move that folder away (or delete "
                                  "it) to start the run again from scratch") from None
        return True

    def save_epoch(self, state: dict, metrics: list, best_models: dict) -> None:
        """best_<kind>.pt, metrics.csv, then last.pt: a crash between them leaves no last.pt newer than the rest."""
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
        """Hold the run's `.lock` (released however the process ends): a second trainer is refused or waits."""
        if not dist.is_main() or fcntl is None:    # the other ranks never write
            yield
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self / ".lock", "a+", errors="replace")   # a damaged .lock is still a lock
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


def _git(repo, *args):
    """`git -C repo args` (its CompletedProcess), or None when git cannot be run."""
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty(repo) -> bool | None:
    """Whether `repo`'s tracked files differ from HEAD after git's clean filters; None when git cannot tell."""
    _git(repo, "update-index", "-q", "--refresh")
    done = _git(repo, "diff", "--quiet", "HEAD", "--")
    return {0: False, 1: True}.get(done.returncode) if done is not None else None


def provenance(device: torch.device, data_source: str) -> dict:
    """Commit, library versions, device and data: what every reported number names."""
    repo = Path(__file__).resolve().parent.parent
    commit = _git(repo, "rev-parse", "HEAD")
    import torchvision
    return {"git_commit": (commit.stdout.strip() or None) if commit and commit.returncode == 0 else None,
            "git_dirty": git_dirty(repo), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "device": describe_device(device),
            "data_source": data_source, "world_size": dist.world_size()}


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    bf16 = ", native bf16" if cpu_has_native_bf16() else ", no native bf16"
    named = f"{cpu_model()}, " if cpu_model() else ""
    return f"cpu ({named}{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads{bf16})"


def describe_data(dataset: D.CIFAR10, data_dir, data_id: str) -> str:
    """Provenance's data source: the report's label, the folder and the data fingerprint."""
    where = f"{data_dir}; " if data_dir is not None else ""
    return f"{D.describe_source(dataset, data_dir)} ({where}fingerprint {data_id})"


def _arch_problem(arch) -> str | None:
    """Why a checkpoint's recorded `arch` cannot be the arguments of build_model, or None."""
    if not isinstance(arch, dict):
        return f"must be a dict of build_model's arguments, got {type(arch).__name__}"
    pos = lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 2**20  # noqa: E731
    ints = lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 64 and all(map(pos, v))  # noqa: E731
    stages = len(arch["widths"]) if ints(arch.get("widths")) else 3
    rules = {"se": (lambda v: isinstance(v, bool), "true or false"),
             "se_placement": (lambda v: isinstance(v, str) and v in SE_PLACEMENTS, f"one of {SE_PLACEMENTS}"),
             "norm_std": (lambda v: isinstance(v, str) and v in NORM_STDS, f"one of {tuple(NORM_STDS)}"),
             "num_classes": (pos, "a positive integer"), "se_reduction": (pos, "a positive integer"),
             "widths": (ints, "a list of positive integers"),
             "blocks": (lambda v: ints(v) and len(v) == stages, "a list of positive integers, one per width")}
    for key, value in arch.items():
        if key not in rules:
            return f"has an unknown setting {reprlib.repr(key)}"
        ok, want = rules[key]
        if not ok(value):
            return f"setting '{key}' must be {want}, got {reprlib.repr(value)}"
    return None


def check_arch(ckpt: dict, arch: dict) -> None:
    """Refuse a checkpoint whose recorded architecture is not `arch` (or is malformed)."""
    def plain(a):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in a.items()}

    got, where = ckpt.get("arch"), ckpt.get("_path", "checkpoint")
    if got is None:
        return
    problem = _arch_problem(got)
    if problem:
        raise CheckpointError(f"{where}: field 'arch' {problem}; it is damaged or not from samlib")
    if plain(got) != plain(arch):
        raise CheckpointError(f"{where} holds a model with architecture "
                              f"{got}, not the expected {arch}; it belongs to another config")


def load_model(path, device="cpu", expect_arch: dict | None = None) -> torch.nn.Module:
    """A model from a samlib checkpoint, its architecture and tensors checked first; else a CheckpointError."""
    fix = f"restore it, or train its run again (move {Path(path).parent} away, then run the same train command)"
    try:
        ckpt = load_checkpoint(path, map_location=device)
        where, arch, state = ckpt["_path"], ckpt.get("arch"), ckpt.get("model")
        if arch is None:
            raise CheckpointError(f"{where}: field 'arch' is missing, so the model cannot be rebuilt")
        check_arch(ckpt, expect_arch if expect_arch is not None else arch)
        if isinstance(state, dict) and sum(arch.get("blocks", (4, 4, 3))) > len(state):  # never build those
            raise CheckpointError(f"{where}: field 'model' holds {len(state)} tensors, too few for its "
                                  f"recorded architecture {arch}")
        with torch.device("meta"):                   # keys and shapes, no memory
            check_tensors(state, build_model(**arch).state_dict(), where, "model")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {fix}") from None
    model = build_model(**arch).to(device)
    model.load_state_dict(state)                     # check_tensors made sure that it fits
    return model.eval()


def load_run_models(run_dir, device="cpu"):
    """(regular, ema-or-None) from a run directory's best checkpoints."""
    run_dir = Path(run_dir)
    if not present(run_dir / "best_regular.pt"):
        raise SamlibError(f"{run_dir} holds no best_regular.pt: is it a finished samlib run directory? "
                          "(python -m samlib train ... prints the run directory)")
    regular = load_model(run_dir / "best_regular.pt", device)
    ema_path = run_dir / "best_ema.pt"
    ema = load_model(ema_path, device, expect_arch=regular.arch) if present(ema_path) else None
    return regular, ema


_ROW_NUMBERS = ("epoch", "lr", "train_loss", "train_acc_mixed", "train_acc_clean", "val_acc", "test_acc",
                "seconds")   # what the loop reads back from earlier rows (progress line, final.json)
_SCALER = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_resume_state(ckpt: dict, cfg: Config) -> None:
    """Refuse a resume state of another run (Config.hash), lacking a part, or with unsound plain fields."""
    where, recorded = ckpt.get("_path", "checkpoint"), ckpt.get("config")
    recorded = recorded if recorded is None else from_dict(recorded, source=f"{where} field 'config'")
    if recorded is not None and recorded.hash() != cfg.hash():
        a, b, skip = recorded.to_dict(), cfg.to_dict(), {*recorded.inert_fields()} & {*cfg.inert_fields()}
        keys = [k for k in b if a[k] != b[k] and k not in skip | set(SPEED_KNOBS)]

        def show(d):
            return ", ".join(f"{k} {','.join(map(str, d[k])) if isinstance(d[k], tuple) else d[k]}" for k in keys)
        raise CheckpointError(f"{where} records {show(a)} but this run has {show(b)}: the file belongs to another run")

    def bad(field, problem):
        raise CheckpointError(f"{where}: field '{field}' {problem}")

    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "metrics", "best") + (("ema",) if cfg.ema else ()):
        if key not in ckpt:
            bad(key, "is missing" + (" (the config has EMA on)" if key == "ema" else "")
                + "; not a resume checkpoint of this samlib version?")
    epoch, rows, best = ckpt["epoch"], ckpt["metrics"], ckpt["best"]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch <= cfg.epochs):
        bad("epoch", f"must be an integer in 0..{cfg.epochs}, got {reprlib.repr(epoch)}")
    if not isinstance(rows, list) or len(rows) != epoch:
        bad("metrics", f"must be a list of {epoch} rows (one per epoch), got {reprlib.repr(rows)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(_number(row.get(k)) for k in _ROW_NUMBERS):
            bad("metrics", f"row {i} must hold the numbers {', '.join(_ROW_NUMBERS)}, got {reprlib.repr(row)}")
    if not (isinstance(best, dict) and all(_number(best.get(k)) for k in ("regular", "ema"))
            and all(best.get(k) is None or isinstance(best.get(k), int) for k in ("regular_epoch", "ema_epoch"))):
        bad("best", f"must hold the numbers regular and ema and their epochs, got {reprlib.repr(best)}")
    precision = ckpt.get("precision", "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        bad("precision", f"must be 'fp32', 'bf16' or 'fp16', got {reprlib.repr(precision)}")
    scaler = ckpt.get("scaler", {})
    if not isinstance(scaler, dict) or (precision == "fp16" and not all(_number(scaler.get(k)) for k in _SCALER)):
        bad("scaler", f"must be a GradScaler state ({', '.join(_SCALER)}), got {reprlib.repr(scaler)}")
