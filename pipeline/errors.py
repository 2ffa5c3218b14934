"""The errors a user can cause, each with one clear message.

Every stage raises a subclass of `PipelineError` for bad input (a missing file, a bad config value, an impossible
shape). Entry points catch `PipelineError` and print its message without a stack trace; anything else is a bug and
keeps its trace.
"""


class PipelineError(Exception):
    """Base class: the message names the file/field and what was expected."""


class ConfigError(PipelineError):
    """A config file or a `--set` override is wrong: unknown key, wrong type, impossible value."""

    def __init__(self, field: str, message: str, source: str | None = None):
        self.field = field
        self.reason = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


class DataError(PipelineError):
    """A corpus is missing, empty, in an unknown format, or yields no rows."""


class TokenizerError(PipelineError):
    """A tokenizer cannot be trained or loaded as asked."""


class PlatformError(PipelineError):
    """The device, backend or distributed setup cannot be used as asked."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, incomplete, corrupt, or from a model other than the config describes."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are damaged (unreadable, truncated, or not matching its manifest): an older one may work."""
