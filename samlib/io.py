"""Files that survive a crash and never run code when read.

A Colab runtime can be killed at any instant, so everything a run writes (checkpoints,
metrics, json) goes through `atomic_write_bytes`: write a temporary file in the same
folder, fsync it, rename it over the target.  A reader sees the old file or the new one,
never half of one.  Checkpoints also get a `.sha256` sidecar, and the previous one is
kept as `<name>.prev.pt`, so a corrupt or truncated file is detected and the last good
one is used instead.  Checkpoints are read with `torch.load(weights_only=True)`: a file
from elsewhere can hold tensors and plain data, never code.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError, SamlibError

CHECKPOINT_FORMAT = "samlib-checkpoint-v1"
_UMASK = os.umask(0)
os.umask(_UMASK)

def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` so that a crash leaves either the old or the new file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise SamlibError(f"cannot write to {path.parent}: {e.strerror}; choose a writable "
                          "folder (--out for runs, --output for a submission)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(obj: dict, path, keep_previous: bool = True) -> Path:
    """Atomically save a checkpoint dict with a sha256 sidecar; keep the old one as .prev."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **obj}, buf)
    data = buf.getvalue()
    digest, sidecar = hashlib.sha256(data).hexdigest(), _sidecar(path)
    if keep_previous and path.exists():
        os.replace(path, _previous(path))
        if sidecar.exists():
            os.replace(sidecar, _sidecar(_previous(path)))
    # The sidecar lists the digests a complete file may have: while a file is replaced in
    # place (keep_previous=False), the old one's and the new one's; afterwards only the new.
    # A crash at any instant leaves the old file or the new one, both vouched for - never a
    # good checkpoint lost, and a half-written one reads as corrupt (then .prev is used).
    vouched = []
    if path.exists():
        vouched = (sidecar.read_text().split() if sidecar.exists()
                   else [hashlib.sha256(path.read_bytes()).hexdigest()])
    atomic_write_text(sidecar, "\n".join(dict.fromkeys([digest, *vouched])) + "\n")
    atomic_write_bytes(path, data)
    if vouched:
        atomic_write_text(sidecar, digest + "\n")
    return path


def _load_one(path: Path, map_location) -> dict:
    data = path.read_bytes()
    sidecar = _sidecar(path)
    if sidecar.exists() and hashlib.sha256(data).hexdigest() not in sidecar.read_text().split():
        raise CheckpointError(f"{path} is corrupt or truncated (sha256 does not match "
                              f"{sidecar.name}); it was not loaded")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain data "
            f"(loaded with weights_only=True, so nothing in it was run). Only load checkpoints "
            f"written by samlib. Detail: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated and was not loaded "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a samlib checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return obj


def load_checkpoint(path, map_location="cpu", fallback: bool = True) -> dict:
    """Load a checkpoint safely; if it is corrupt and a `.prev` exists, use that instead.

    The returned dict carries `"_path"`: the file actually loaded.
    """
    path = Path(path)
    candidates = [path] + ([_previous(path)] if fallback else [])
    errors = []
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            obj = _load_one(candidate, map_location)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            print(f"warning: {errors[0]}; using the previous good checkpoint {candidate}")
        obj["_path"] = str(candidate)
        return obj
    if errors:
        raise CheckpointError(errors[0] + "; no earlier good checkpoint exists")
    raise CheckpointError(f"no checkpoint at {path}; train the run first (python -m samlib train ...)")
