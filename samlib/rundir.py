"""A run directory `<config>-s<seed>-<config hash>`: config, metrics.csv, last.pt, best_<kind>.pt, final.json."""
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
from .config import SPEED_KNOBS, Config, _is_int, _validate, from_dict
from .device import cpu_has_native_bf16, cpu_model
from .errors import CheckpointError, ConfigError, SamlibError
from .io import (atomic_write_text, check_fields, check_tensors, load_checkpoint, present, read_json,
                 save_checkpoint, write_json)
from .model import ARCH_FIELDS, build_model

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
        return cls(Path(out) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', cfg.name)}-s{cfg.seed}-{cfg.hash()}")

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
            handle.truncate(0)
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


def git_dirty(repo, outputs=("results",)) -> bool | None:
    """Whether `repo`'s tracked files, less the reports under `outputs` (a publish rewrites them),
    differ from HEAD after git's clean filters; None when git cannot tell."""
    _git(repo, "update-index", "-q", "--refresh")
    done = _git(repo, "diff", "--quiet", "HEAD", "--", ".", *(f":(exclude){path}" for path in outputs))
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


def check_arch(ckpt: dict, arch: dict) -> None:
    """Refuse a checkpoint whose recorded `arch` is malformed or not `arch`; config.py checks its Config fields."""
    got, where = ckpt.get("arch"), ckpt.get("_path", "checkpoint")

    def damaged(problem):
        raise CheckpointError(f"{where}: field 'arch' {problem}; it is damaged or not from samlib")

    if got is None:
        return
    if not isinstance(got, dict):
        damaged(f"must be a dict of build_model's arguments, got {type(got).__name__}")
    for key, value in got.items():
        if key not in (*ARCH_FIELDS, "num_classes", "se_reduction"):
            damaged(f"has an unknown setting {reprlib.repr(key)}")
        if key not in ARCH_FIELDS and not (_is_int(value) and 1 <= value <= 2**20):
            damaged(f"setting '{key}' must be a positive integer, got {reprlib.repr(value)}")
    try:
        _validate(Config(**{key: value for key, value in got.items() if key in ARCH_FIELDS}))
    except ConfigError as e:
        damaged(f"holds an invalid setting ({e})")
    if got != arch:
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


def check_resume_state(ckpt: dict, cfg: Config) -> None:
    """Refuse a resume state of another run (Config.hash), lacking a part, or with unsound plain fields."""
    def numbers(d, keys):   # a dict with a number (not a bool) at each of `keys`
        return isinstance(d, dict) and all(isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)
                                           for k in keys)

    where, recorded = ckpt.get("_path", "checkpoint"), ckpt.get("config")
    recorded = recorded if recorded is None else from_dict(recorded, source=f"{where} field 'config'")
    if recorded is not None and recorded.hash() != cfg.hash():
        a, b, skip = recorded.to_dict(), cfg.to_dict(), {*recorded.inert_fields()} & {*cfg.inert_fields()}
        keys = [k for k in b if a[k] != b[k] and k not in skip | set(SPEED_KNOBS)]
        said = [", ".join(f"{k} {','.join(map(str, d[k])) if isinstance(d[k], tuple) else d[k]}" for k in keys)
                for d in (a, b)]
        raise CheckpointError(f"{where} records {said[0]} but this run has {said[1]}: the file belongs to another run")
    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "metrics", "best") + (("ema",) if cfg.ema else ()):
        if key not in ckpt:
            raise CheckpointError(f"{where}: field '{key}' is missing{' (EMA is on)' if key == 'ema' else ''}; "
                                  "not a resume checkpoint of this samlib version?")
    epoch, precision = ckpt["epoch"], ckpt.get("precision", "fp32")
    rules = {   # field -> (test, what it must be), in this order: metrics needs a sound epoch, scaler a precision
        "epoch": (lambda v: _is_int(v) and 0 <= v <= cfg.epochs, f"an integer in 0..{cfg.epochs}"),
        "metrics": (lambda v: isinstance(v, list) and len(v) == epoch and all(numbers(r, _ROW_NUMBERS) for r in v),
                    f"a list of {epoch} rows (one per epoch), each with the numbers {', '.join(_ROW_NUMBERS)}"),
        "best": (lambda v: numbers(v, ("regular", "ema")) and all(isinstance(v.get(k), (int, type(None)))
                                                                  for k in ("regular_epoch", "ema_epoch")),
                 "the numbers regular and ema and their epochs"),
        "precision": (lambda v: v in ("fp32", "bf16", "fp16"), "'fp32', 'bf16' or 'fp16'"),
        "scaler": (lambda v: isinstance(v, dict) and (precision != "fp16" or numbers(v, _SCALER)),
                   f"a GradScaler state ({', '.join(_SCALER)})"),
    }
    for field, (test, want) in rules.items():
        value = ckpt.get(field, {"precision": "fp32", "scaler": {}}.get(field))
        if not test(value):
            raise CheckpointError(f"{where}: field '{field}' must be {want}, got {reprlib.repr(value)}")
