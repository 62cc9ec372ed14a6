"""User-facing errors: each one is a single line naming the file/field, the problem and the fix."""


class ContinualOPDError(Exception):
    """Base class: the CLI prints `error: <message>` (one line) and exits non-zero."""

    exit_code = 1


class ConfigError(ContinualOPDError):
    """A recipe or suite file is malformed (exit code 2)."""

    exit_code = 2


class DataError(ContinualOPDError):
    """A data file is missing, empty or malformed (exit code 2)."""

    exit_code = 2


class RunDirError(ContinualOPDError):
    """The run directory cannot be used (exists and is not empty, nothing to resume, ...)."""

    exit_code = 2


class ModelError(ContinualOPDError):
    """A model/tokenizer cannot be loaded or is incompatible with its teacher."""

    exit_code = 2


class TrainingError(ContinualOPDError):
    """Training cannot continue (e.g. a NaN/inf loss); the message names the last good checkpoint."""

    exit_code = 1
