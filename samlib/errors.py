"""User-facing errors: a `SamlibError` is a mistake the user can fix (one `error:` line); read_bytes raises them."""
from pathlib import Path


class SamlibError(Exception):
    """A problem with the user's input; the message says what went wrong and what to do."""


class DataError(SamlibError):
    """Data files missing, malformed or untrusted."""


class ConfigError(SamlibError):
    """Unknown config/profile name or an invalid hyperparameter."""


class CheckpointError(SamlibError):
    """A checkpoint that is missing, corrupt, untrusted or of another architecture."""


def read_problem(path, e: OSError) -> str:
    """Why an OSError stopped reading `path`, and what to do about it."""
    if isinstance(e, IsADirectoryError):
        return f"cannot read {path}: it is a folder, not a file (move it away)"
    if isinstance(e, PermissionError):
        return f"cannot read {path}: permission denied; make it readable (chmod u+r {path})"
    return f"cannot read {path}: {e.strerror or e}"


def read_bytes(path, error: type, fix: str) -> bytes:
    """The bytes of a file the user gave; an OSError becomes one `error` naming the file and `fix`."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise error(f"{read_problem(path, e)}; {fix}") from None
