"""The generation API's types: options in, events and a result out, the same on every backend.

`GenerationOptions` is validated once, where it is made (by `Model.generate`, the CLI, the
server's request parsing), and read by every backend. `Model.stream_tokens()` returns a
`TokenStream`: iterate it for `StreamEvent`s; its `.result` is the `GenerationResult`, complete
once the stream is exhausted or closed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from convert.core.errors import GenerationError


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """How to generate. The order and meaning of the sampling steps follow transformers'
    `generate`: repetition penalty, temperature, top-k, top-p; temperature 0 is greedy.
    OpenAI's presence and frequency penalties come after the repetition penalty."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already seen
    presence_penalty: float = 0.0  # OpenAI's: subtracted from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    seed: int | None = None  # makes sampling repeatable
    min_new_tokens: int = 0  # end-of-sequence is not allowed before this many new tokens

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str) or stop is None:
            stop = (stop,) if stop else ()
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        if not all(isinstance(s, str) for s in self.stop):
            raise GenerationError("stop must be a string or a list of strings")
        if self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be a number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not math.isfinite(self.repetition_penalty):
            raise GenerationError("top_p and repetition_penalty must be finite numbers")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise GenerationError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_new_tokens < 0:
            raise GenerationError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2 <= value <= 2:
                raise GenerationError(f"{name} must be between -2 and 2, got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes_generated(self) -> bool:
        """Whether OpenAI's presence/frequency penalties apply (engines that sample by
        themselves do not have them: those backends then sample token by token)."""
        return bool(self.presence_penalty or self.frequency_penalty)

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **changes: Any) -> GenerationOptions:
        """`options` (default: the defaults) with the keyword arguments given applied."""
        base = options if options is not None else cls()
        return dataclasses.replace(base, **changes) if changes else base


class GenerationKwargs(TypedDict, total=False):
    """The fields of GenerationOptions as keyword arguments (for type checkers)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: str | Sequence[str] | None
    seed: int | None
    min_new_tokens: int


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only (an end-of-sequence token included when produced)
    finish_reason: str  # "stop" (end of sequence or stop string) | "length"
    prompt_tokens: int
    seconds: float = 0.0
    first_token_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        decode = self.seconds - self.first_token_seconds
        return (len(self.token_ids) - 1) / decode if len(self.token_ids) > 1 and decode > 0 else 0.0


@dataclass
class StreamEvent:
    """One generated token and the text it made showable (often "", for partial characters)."""

    token_id: int | None  # None for the final flush of held-back text
    text: str


class TokenStream(Iterator[StreamEvent]):
    """The events of one generation, and its result.

    `result` fills as the stream is read and is complete once it is exhausted; `close()` (or
    leaving a `with` block) stops the generation at once and frees the engine."""

    def __init__(self, events: Generator[StreamEvent, None, None], result: GenerationResult):
        self._events = events
        self.result = result

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def texts(self) -> Iterator[str]:
        """Only the non-empty text pieces (closing this iterator closes the stream)."""
        try:
            for event in self:
                if event.text:
                    yield event.text
        finally:
            self.close()

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
