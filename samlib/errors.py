"""User-facing errors: a `SamlibError` is a mistake the user can fix; the command line prints its
message on one line and exits with status 2, notebooks see the exception."""


class SamlibError(Exception):
    """A problem with the user's input; the message says what went wrong and what to do."""


class DataError(SamlibError):
    """Data files missing, malformed or untrusted."""


class ConfigError(SamlibError):
    """Unknown config/profile name or an invalid hyperparameter."""


class CheckpointError(SamlibError):
    """A checkpoint that is missing, corrupt, untrusted or of another architecture."""
