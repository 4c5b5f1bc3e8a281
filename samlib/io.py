"""Files that survive a crash and never run code when read: atomic writes (temporary file, fsync, rename),
checkpoints with a `.sha256` sidecar and a `.prev` copy, read with `torch.load(weights_only=True)`."""
from __future__ import annotations

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
    code = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    hint = _WRITE_HINTS.get(e.errno, "check the folder (space, permissions) or choose another one")
    kept = kept or (f"the previous {path.name} is unchanged" if existed else f"no partial {path.name} was left")
    return SamlibError(f"cannot write to {target}: {e.strerror or e}{f' [{code}]' if code else ''}; "
                       f"{hint} (--out for runs, --output for a submission), then run the same "
                       f"command again; {kept}")


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path`: a crash leaves the old or the new file; an OSError is a SamlibError saying what to do."""
    path = Path(path)
    try:
        existed, is_dir = path.exists(), path.is_dir()
    except OSError as e:                     # e.g. a folder on the way that cannot be searched
        raise _write_error(path.parent, path, e, False, "nothing was written") from None
    if is_dir:
        raise SamlibError(f"cannot write to {path}: it is a folder; give a file name instead "
                          f"(e.g. {path / 'submission.csv'} for --output)")
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
        try:
            Path(tmp).unlink(missing_ok=True)
        except OSError:
            pass
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


_KINDS = {  # JSON field kind -> (test, description)
    "text": (lambda v: isinstance(v, str), "text"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63, "an integer"),
    "number": (lambda v: isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)
                                                   and abs(v) < 2**63), "a number"),
    "object": (lambda v: isinstance(v, dict), "an object {...}"),
    "list": (lambda v: isinstance(v, list), "a list [...]"),
    "null": (lambda v: v is None, "null"),
}
_JSON_NAMES = {dict: "a JSON object {...}", list: "a JSON list [...]", str: "a string",
               bool: "true/false", int: "a number", float: "a number", type(None): "null"}


def read_json(path, expect=dict, fix: str = JSON_FIX):
    """A JSON file holding an `expect` (None: anything); any problem is a DataError naming the file and the fix."""
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
    if expect is not None and not isinstance(obj, expect):
        raise DataError(f"{path} holds {_JSON_NAMES.get(type(obj), type(obj).__name__)}, expected "
                        f"{_JSON_NAMES.get(expect, getattr(expect, '__name__', expect))}; {fix}")
    try:   # json accepts lone surrogates such as "\\ud800", which no file or terminal can write
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path} holds text that is not valid Unicode ({e.object[e.start:e.end]!a}); {fix}") from None
    return obj


def check_fields(obj: dict, path, required: dict = (), optional: dict = (), fix: str = JSON_FIX) -> dict:
    """`obj` (read from `path`) once each field of `required` / `optional` has its kinds ("int|null": either)."""
    for key, kinds in [*dict(required).items(), *dict(optional).items()]:
        if key not in obj:
            if key in dict(required):
                raise DataError(f"{path}: field '{key}' is missing; {fix}")
            continue
        tests = [_KINDS[k] for k in kinds.split("|")]
        if not any(test(obj[key]) for test, _ in tests):
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
            bad(f"entry {key!r} is {got.dtype} {tuple(got.shape)}, the model needs "
                f"{want.dtype} {tuple(want.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{where}: field '{field}' entry {key!r} holds NaN or infinite values "
                                  "(its run diverged, or the file is damaged)")


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


class _Unreadable(CheckpointError):
    """A checkpoint or sidecar that cannot be read at all (it may be fine: no `.prev` fallback)."""


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _vouched_digests(path: Path):
    """The sha256 digests the sidecar of `path` lists, or None when it has no sidecar."""
    sidecar = _sidecar(path)
    try:
        raw = sidecar.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _Unreadable(f"{read_problem(sidecar, e)}; {path} was not loaded") from None
    try:   # one digest a line (other words, e.g. the file name `sha256sum` writes, are ignored)
        digests = [w.lower() for w in raw.decode("ascii").split() if _SHA256.fullmatch(w)]
    except UnicodeDecodeError:
        digests = []
    if not digests:
        raise CheckpointError(f"{path} cannot be verified: its sidecar {sidecar.name} is damaged "
                              f"(it lists no sha256 digest), so it was not loaded; if you trust "
                              f"{path.name}, delete {sidecar.name} and load it again")
    return digests


def _load_one(path: Path, map_location) -> dict:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Unreadable(f"{read_problem(path, e)}; it was not loaded") from None
    digests = _vouched_digests(path)
    if digests is not None and hashlib.sha256(data).hexdigest() not in digests:
        raise CheckpointError(f"{path} is corrupt or truncated (sha256 does not match "
                              f"{_sidecar(path).name}); it was not loaded")
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
    for candidate in [path, _previous(path)] if fallback else [path]:
        try:
            if not candidate.exists():
                continue
            obj = _load_one(candidate, map_location)
        except OSError as e:      # e.g. a folder on the way without search permission
            raise CheckpointError(f"{read_problem(candidate, e)}; it was not loaded") from None
        except _Unreadable as e:
            raise CheckpointError(str(e)) from None
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
