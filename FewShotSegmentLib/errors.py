"""Errors a user can act on. Everything the CLI and worker report as a clear message derives from
FewShotError; anything else is a bug and is reported with its traceback."""


class FewShotError(Exception):
    """Base class of the errors this library reports to users."""


class InputError(FewShotError, ValueError):
    """Bad input: empty template, wrong geometry, 2D/4D image, NaNs, unreadable file, ..."""


class CheckpointError(FewShotError):
    """A weights or adapter file is missing, corrupt, or does not match what was asked for."""


class Cancelled(FewShotError):
    """The job was cancelled (SIGTERM or a cancel callback)."""
