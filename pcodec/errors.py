"""Error classes, each carrying the process exit code the CLI reports for it."""


class PcodecError(Exception):
    """Base class; the message is one line meant for the user."""

    exit_code = 1


class RuntimeIOError(PcodecError):
    """Unreadable or unwritable files, images that cannot be read, missing models."""

    exit_code = 1


class UsageError(PcodecError):
    exit_code = 2


class StreamError(PcodecError):
    """Corrupt, truncated or unsupported .pcb stream."""

    exit_code = 3


class ModelError(PcodecError):
    """The model a stream or --model names is not installed."""

    exit_code = 4
