"""Crash-safe files read without running code: atomic writes, checkpoints with a sha256 sidecar and a .prev copy."""
import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import reprlib
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError, DataError, SamlibError, read_bytes, read_problem

CHECKPOINT_FORMAT = "samlib-checkpoint-v1"
_UMASK = os.umask(0)
os.umask(_UMASK)

_DENIED = "permission denied: choose a folder you can write to (or fix its permissions)"
_WRITE_HINTS = {   # errno -> what to do about it
    errno.ENOSPC: "the disk is full: free some space (or choose a folder on another disk)",
    errno.EDQUOT: "the disk quota is used up: free some space (or choose a folder on another disk)",
    errno.EFBIG: "the file is larger than this system allows (a file-size limit, `ulimit -f`, or the "
                 "file system's maximum): raise the limit or choose a folder on another disk",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: _DENIED, errno.EPERM: _DENIED,
    errno.EISDIR: "that path is a folder: give a file name instead",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter path",
}


def _write_error(target: Path, path: Path, e: OSError, existed: bool, kept: str = "") -> SamlibError:
    """A SamlibError for an OSError while writing `path` (at `target`: it or its folder)."""
    code = errno.errorcode.get(e.errno, "")
    hint = _WRITE_HINTS.get(e.errno, "check the folder (space, permissions) or choose another one")
    kept = kept or (f"the previous {path.name} is unchanged" if existed else f"no partial {path.name} was left")
    return SamlibError(f"cannot write to {target}: {e.strerror or e}{f' [{code}]' if code else ''}; {hint} (--out for "
                       f"runs, --output for a submission), then run the same command again; {kept}")


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path`: a crash leaves the old or the new file; an OSError is a SamlibError saying what to do."""
    path = Path(path)
    try:
        existed = path.exists()              # (a folder in its place: os.replace says so)
    except OSError as e:                     # e.g. a folder on the way that cannot be searched
        raise _write_error(path.parent, path, e, False, "nothing was written") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if isinstance(e, FileExistsError):   # mkdir met a file where a folder should be
            e = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), e.filename)
        raise _write_error(path.parent, path, e, existed) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException as e:        # an interrupt too: never leave the temporary file
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, path, e, existed) from None
        raise
    try:  # make the rename itself durable (some file systems cannot fsync a folder)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM):
            raise _write_error(path.parent, path, e, existed,
                               f"{path.name} was written but may not survive a power cut") from None
    return path


def atomic_write_text(path, text: str) -> Path:
    """`atomic_write_bytes` of `text` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    """`obj` as indented, key-sorted JSON (a non-JSON value is written as its str), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


JSON_FIX = ("it is damaged or was edited by hand: restore it, or delete it (a run folder can be "
            "moved away and its run trained again)")


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, for an error message quoting a file's content."""
    return text if len(text) <= limit else text[:limit] + "..."


def present(path) -> bool:
    """Whether `path` exists; True when it cannot even be looked at (its reader then says why)."""
    try:
        return Path(path).exists()
    except OSError:
        return True


_KINDS = {  # JSON value kind -> (test, description); the first kind that fits names a value
    "object": (lambda v: isinstance(v, dict), "a JSON object {...}"),
    "list": (lambda v: isinstance(v, list), "a JSON list [...]"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "number": (lambda v: isinstance(v, float) or _KINDS["int"][0](v), "a number"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63, "an integer"),
    "null": (lambda v: v is None, "null"),
}


def read_json(path, fix: str = JSON_FIX) -> dict:
    """A JSON file holding an object; any problem is a DataError naming the file and the fix."""
    raw = read_bytes(path, DataError, fix)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; "
                        f"truncated?); {fix}") from None
    except RecursionError:
        raise DataError(f"{path} is nested too deeply to be a samlib file; {fix}") from None
    if not isinstance(obj, dict):
        held = next((name for test, name in _KINDS.values() if test(obj)), type(obj).__name__)
        raise DataError(f"{path} holds {held}, expected a JSON object {{...}}; {fix}")
    try:   # json accepts lone surrogates such as "\\ud800", which no file or terminal can write
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path} holds text that is not valid Unicode ({e.object[e.start:e.end]!a}); {fix}") from None
    return obj


def check_fields(obj: dict, path, required: dict = (), optional: dict = (), fix: str = JSON_FIX) -> dict:
    """`obj` (read from `path`) once each field of `required` / `optional` has its kinds ("int|null": either)."""
    for key, kinds in [*dict(required).items(), *dict(optional).items()]:
        if key not in obj and key in dict(required):
            raise DataError(f"{path}: field '{key}' is missing; {fix}")
        tests = [_KINDS[k] for k in kinds.split("|")]
        if key in obj and not any(test(obj[key]) for test, _ in tests):
            want = " or ".join(name for _, name in tests)
            raise DataError(f"{path}: field '{key}' must be {want}, got {reprlib.repr(obj[key])}; {fix}")
    return obj


def check_tensors(state, template: dict, where, field: str) -> None:
    """A CheckpointError unless `state` holds `template`'s keys, each a finite dense tensor of its shape and kind."""
    def bad(problem):
        raise CheckpointError(f"{where}: field '{field}' {problem}; it is damaged or belongs to another config")

    if not isinstance(state, dict):
        bad(f"must be a dict of tensors, got {type(state).__name__}")
    missing, extra = [k for k in template if k not in state], [k for k in state if k not in template]
    if missing or extra:
        bad(f"lacks {len(missing)} of the model's tensors and holds {len(extra)} it does not have, "
            f"e.g. {reprlib.repr((missing or extra)[0])}")
    for key, want in template.items():
        got = state[key]
        if (not isinstance(got, torch.Tensor) or got.layout != torch.strided or got.is_meta
                or got.is_quantized or got.is_complex()):
            bad(f"entry {key!r} must be a dense real tensor, got {reprlib.repr(got)}")
        if got.shape != want.shape or got.is_floating_point() != want.is_floating_point():
            bad(f"entry {key!r} is {got.dtype} {tuple(got.shape)}, the model needs {want.dtype} {tuple(want.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{where}: field '{field}' entry {key!r} holds NaN or infinite values "
                                  "(its run diverged, or the file is damaged)")


def save_checkpoint(obj: dict, path, keep_previous: bool = True) -> Path:
    """Atomically save a checkpoint dict with a sha256 sidecar; keep the old one as .prev."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **obj}, buf)
    data = buf.getvalue()
    digest, sidecar = hashlib.sha256(data).hexdigest(), Path(f"{path}.sha256")
    if keep_previous and path.exists():
        previous = path.with_name(path.stem + ".prev" + path.suffix)
        os.replace(path, previous)
        if sidecar.exists():
            os.replace(sidecar, f"{previous}.sha256")
    # While a file is replaced the sidecar vouches for both digests: a crash leaves a vouched-for file.
    vouched = []
    if path.exists():
        vouched = (sidecar.read_bytes().decode("ascii", "replace").split() if sidecar.exists()
                   else [hashlib.sha256(path.read_bytes()).hexdigest()])
    atomic_write_text(sidecar, "\n".join(dict.fromkeys([digest, *vouched])) + "\n")
    atomic_write_bytes(path, data)
    if vouched:
        atomic_write_text(sidecar, digest + "\n")
    return path


def _load_one(path: Path, map_location) -> dict:
    """One checkpoint, checked against the digests its sidecar lists (when it has one); an OSError passes."""
    data, sidecar = path.read_bytes(), Path(f"{path}.sha256")
    try:
        listed = sidecar.read_bytes().decode("ascii", "replace").split()
    except FileNotFoundError:
        listed = None
    if listed is not None:   # one digest a line (other words, e.g. the file name `sha256sum` writes, are ignored)
        if not any(re.fullmatch(r"[0-9a-fA-F]{64}", word) for word in listed):
            raise CheckpointError(f"{path} cannot be verified: its sidecar {sidecar.name} is damaged "
                                  f"(it lists no sha256 digest), so it was not loaded; if you trust "
                                  f"{path.name}, delete {sidecar.name} and load it again")
        if hashlib.sha256(data).hexdigest() not in (word.lower() for word in listed):
            raise CheckpointError(f"{path} is corrupt or truncated (sha256 does not match "
                                  f"{sidecar.name}); it was not loaded")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        useful = [line for line in lines if "GLOBAL" in line or "WeightsUnpickler" in line]
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain data, or "
            f"is damaged (loaded with weights_only=True, so nothing in it was run). Only load "
            f"checkpoints written by samlib. Detail: {clip((useful or lines or [''])[0])}") from None
    except MemoryError:
        raise
    except Exception as e:   # BadZipFile, RuntimeError, EOFError, a tar archive's IndexError, ...
        detail = clip(str(e).splitlines()[0] if str(e) else "")
        raise CheckpointError(f"{path} is corrupt or truncated and was not loaded "
                              f"({type(e).__name__}: {detail})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a samlib checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return obj


def load_checkpoint(path, map_location="cpu", fallback: bool = True) -> dict:
    """A checkpoint read safely (sha256, weights_only), else its `.prev`, with "_path" set; or a CheckpointError."""
    path, errors = Path(path), []
    previous = path.with_name(path.stem + ".prev" + path.suffix)
    for candidate in [path, previous] if fallback else [path]:
        try:
            if not candidate.exists():
                continue
            obj = _load_one(candidate, map_location)
        except OSError as e:      # the file or its sidecar unreadable: no fallback, it may be fine
            raise CheckpointError(f"{read_problem(e.filename or candidate, e)}; {candidate.name} was not "
                                  "loaded") from None
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            print(f"warning: {errors[0]}; using the previous good checkpoint {candidate}")
        obj["_path"] = str(candidate)
        return obj
    if errors:
        raise CheckpointError(errors[0] + "; no earlier good checkpoint exists: restore the file from a "
                              "copy, or delete it and run the command that wrote it again")
    raise CheckpointError(f"no checkpoint at {path}; train the run first (python -m samlib train ...)")
