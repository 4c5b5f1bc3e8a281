"""Every path a command reads or writes, checked in one place before any work starts.

A symlink loop, a dangling link, a file where a folder belongs (or a folder where a file
belongs) and a folder this process cannot write each end in one `error:` line naming the
flag or parameter it came from, instead of a traceback or an error after minutes of work.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import SamlibError


def resolved(path, what: str) -> Path:
    """`path` with ~ expanded and symlinks resolved (it need not exist yet)."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:         # Python < 3.13: RuntimeError("Symlink loop ...")
        raise SamlibError(f"{what} {path}: a symbolic link in it points back to itself (a loop; "
                          f"{e}); fix or remove the link, or give another path") from None


def _missing(path, what: str, fix: str) -> SamlibError:
    dangling = " (a symbolic link to something that does not exist)" if Path(path).is_symlink() else ""
    return SamlibError(f"{what} {path} not found{dangling}; {fix}")


def input_file(path, what: str, fix: str = "check the path") -> Path:
    """An existing file to read."""
    real = resolved(path, what)
    if not real.exists():
        raise _missing(path, what, fix)
    if real.is_dir():
        raise SamlibError(f"{what} {path} is a folder, not a file; {fix}")
    return real


def input_dir(path, what: str, fix: str = "check the path") -> Path:
    """An existing folder to read."""
    real = resolved(path, what)
    if not real.exists():
        raise _missing(path, what, fix)
    if not real.is_dir():
        raise SamlibError(f"{what} {path} is a file, not a folder; {fix}")
    return real


def output_dir(path, what: str) -> Path:
    """A folder to write in: it, or the nearest of its parents that exists, must be a
    writable folder (it is created when first written)."""
    return _writable(path, what, is_file=False)


def output_file(path, what: str) -> Path:
    """A file to write: not a folder, in a folder this process can write."""
    return _writable(path, what, is_file=True)


def _writable(path, what: str, is_file: bool) -> Path:
    real = resolved(path, what)
    given = Path(os.path.abspath(Path(path).expanduser()))
    for part in (given, *given.parents):         # a dangling link on the way: mkdir would fail
        if part.is_symlink() and not part.exists():
            raise _missing(part, what, "point the link somewhere that exists, or give another path")
    if is_file and real.is_dir():
        raise SamlibError(f"{what} {path} is a folder; give a file name (e.g. {Path(path) / 'out'})")
    existing = real.parent if is_file else real
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        if existing == real:
            raise SamlibError(f"{what} {path} must be a folder, but it is a file; give a folder")
        raise SamlibError(f"{what} {path} cannot be written: its part {existing} is a file, not a "
                          "folder; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SamlibError(f"{what} {path}: {existing} is read-only for this user; give a writable folder")
    return real
