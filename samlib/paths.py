"""Paths from the user, checked before any work starts: a bad one is one `error:` line naming the flag or parameter."""
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


def output_dir(path, what: str, is_file: bool = False) -> Path:
    """A folder to write in (or with `is_file`, a file): it, or its nearest existing parent, is a writable folder."""
    real = resolved(path, what)
    given = Path(os.path.abspath(Path(path).expanduser()))
    for part in (given, *given.parents):         # a dangling link on the way: mkdir would fail
        if part.is_symlink() and not part.exists():
            raise SamlibError(f"{what} {part} not found (a symbolic link to something that does not exist); "
                              "point the link somewhere that exists, or give another path")
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
