"""Typed errors. Library code raises these; only the CLI prints them and exits."""


class MdnError(Exception):
    """A user-facing problem: the message says what was expected, what was found and what to do."""

    exit_code = 2


class ConfigError(MdnError):
    """The YAML config or a --set override is invalid."""


class DataError(MdnError):
    """The labels file or the images it points to are unusable."""


class ModelError(MdnError):
    """A backbone cannot be built or its weights cannot be loaded."""


class CheckpointError(MdnError):
    """A checkpoint is missing, corrupt, untrusted or from an incompatible version."""


class RunError(MdnError):
    """The run folder cannot be used (already holds a run, locked, not writable)."""


class TrainingError(MdnError):
    """Training cannot continue (for example the loss keeps being NaN)."""


class WriteError(MdnError):
    """A file cannot be written (a full disk, a file-size limit, no permission); the message names it."""
