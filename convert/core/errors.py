"""User-facing exceptions.

Every error a user can cause (a bad path, a broken checkpoint, an unsupported model) is a
`PocketLMError`: the CLI prints its message on one line and exits non-zero, no traceback.
Anything else escaping is a bug in PocketLM.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path


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
    """A generation could not be done: a `RequestError`, an `EngineError` or `Overloaded`."""


class RequestError(GenerationError):
    """The caller's: the request cannot be served as asked (prompt too long, no tokenizer for
    text, an option out of range...). A server answers 4xx."""


class EngineError(GenerationError):
    """The engine's or the model's: a request that was fine could not be run (the library
    failed, the model was closed). A server answers 5xx."""


class Overloaded(GenerationError):
    """Neither's: the model's queue of waiting requests is full; the same request may succeed
    later. A server answers 429."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message as one line of output (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "the file is too large for this file system or limit",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
}


def write_failure(path: Path | str, error: OSError, verb: str = "write", note: str = "") -> OutputError:
    """The one line for an OSError met writing `path`: the path, and what the system said."""
    reason = WRITE_ERRORS.get(error.errno or 0) or error.strerror or str(error)
    return OutputError(f"{path}: cannot {verb} it: {reason}{note}")


@contextlib.contextmanager
def writing(path: Path | str, verb: str = "write", note: str = "") -> Iterator[None]:
    """Around code that only writes `path`: any OSError becomes one line naming it."""
    try:
        yield
    except OSError as e:
        raise write_failure(path, e, verb, note) from None
