"""The errors a user can cause, each with one clear message.

Every stage raises a subclass of `PipelineError` for bad input (a missing file, a bad config value, an impossible
shape). Entry points catch `PipelineError` and print its message without a stack trace (`exit_status` does it for a
single-process command); anything else is a bug and keeps its trace.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


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


def env_choice(name: str, choices: Sequence[str]) -> str:
    """The value of environment variable `name`, one of `choices` (unset or blank: "auto"); any other value is a
    ConfigError naming the variable and the values it takes."""
    value = os.environ.get(name, "auto").strip() or "auto"
    if value not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


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


def exit_status(command: Callable[..., int], *args) -> int:
    """A command-line tool's exit status: `command(*args)`'s, or 2 with one `error: ...` line on stderr (and no stack
    trace) when it raises a PipelineError, the user's to fix."""
    try:
        return command(*args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
