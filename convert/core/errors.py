"""User-facing exceptions.

Every error a user can cause (a bad path, a broken checkpoint, an unsupported model) is a
`PocketLMError`: the CLI prints its message on one line and exits non-zero, no traceback.
Anything else escaping is a bug in PocketLM.
"""

from __future__ import annotations


class PocketLMError(Exception):
    """Base class of the errors PocketLM reports to users as one line."""

    exit_code = 1


class CheckpointError(PocketLMError):
    """A checkpoint file is missing, malformed or unsafe to read."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for something outside the tensor-rebuilding allow-list."""


class UnsupportedModelError(PocketLMError):
    """The architecture or a config value is not something PocketLM can convert or run."""


class OutputExistsError(PocketLMError):
    """The output exists and --force was not given."""


class OutputError(PocketLMError):
    """The output could not be written (disk full, read-only, no permission)."""


class ModelLoadError(PocketLMError):
    """A converted model cannot be opened (wrong format, corrupt file, missing engine)."""


class GenerationError(PocketLMError):
    """A request cannot be served as asked (prompt too long, no tokenizer for text...)."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message as one line of output (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
