"""The errors sdgen reports to users: one line each, and a distinct exit code per kind, for shell scripts."""

from __future__ import annotations


class SdgenError(Exception):
    """An error with a one-line message meant for the user (no traceback is shown unless --debug)."""

    exit_code = 1


class UsageError(SdgenError):
    """Bad option values: unknown scheduler, width not a multiple of 8, steps < 1, ..."""

    exit_code = 2


class ModelNotFoundError(SdgenError):
    """A model name or path that does not lead to weights on this machine."""

    exit_code = 3


class BadModelFileError(SdgenError):
    """A model file that exists but cannot be used: corrupt, truncated, pickled, tensors missing or misshapen."""

    exit_code = 4


class OutOfMemoryError(SdgenError):
    exit_code = 5


class OutputError(SdgenError):
    """The output cannot be written (unwritable directory, file exists without --overwrite)."""

    exit_code = 6


class InterruptedError_(SdgenError):
    exit_code = 130
