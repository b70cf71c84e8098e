"""The generation API's types: options in, events and a result out, the same on every backend.

`GenerationOptions` is validated once, where it is made (by `Model.generate`, the CLI, the
server's request parsing), and read by every backend. `Model.stream_tokens()` returns a
`TokenStream`: iterate it for `StreamEvent`s; its `.result` is the `GenerationResult`, complete
once the stream is exhausted or closed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from pocketlm.converters.core.errors import RequestError

MAX_SEQUENCES = 16  # beams or samples of one request (each is a sequence in the engine's cache)
MAX_TOP_LOGPROBS = 20  # alternatives per position (OpenAI's limit)


def _option(default: Any, help: str, **how: Any) -> Any:
    """A GenerationOptions field: its default and its metadata, what the surfaces show of it.
    `help` is its help text ("{default}" in it is the default); `flags`, its CLI option strings
    (default `--field-name`; none: not a flag), with `metavar` and `choices` (the values a flag
    offers); `request`, its name in an OpenAI request (default the field's; None: requests cannot
    set it); `model_default`, whether a request that leaves it out gets the model's generation
    config (transformers' options) rather than this default (OpenAI's meaning of leaving it out)."""
    return dataclasses.field(default=default, metadata={"help": help, **how})


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """How to generate. The order and meaning of the sampling steps follow transformers'
    `generate`: repetition penalty, temperature, top-k, top-p; temperature 0 is greedy.
    OpenAI's presence and frequency penalties come after the repetition penalty.

    `num_beams` > 1 is beam search with transformers' rules (`length_penalty`, `early_stopping`:
    False, True or "never"); `num_return_sequences` is how many of the beams, or how many
    independent samples, come back. `logprobs` asks for each new token's log-probability under
    the model (before any penalty or temperature) and that many top alternatives.

    The fields are declared once, here: `pocketlm run`'s flags and the server's request fields
    are made from each field's metadata (see `_option`)."""

    max_new_tokens: int = _option(
        64,
        "tokens to generate at most (default {default})",
        flags=("--max-new-tokens", "--max-tokens"),
        metavar="N",
        request="max_tokens",
    )
    temperature: float = _option(0.0, "0 = greedy (default); higher = more random")
    top_k: int = _option(0, "sample among the K most likely tokens (0 = all, default)")
    top_p: float = _option(1.0, "sample among the most likely tokens covering this mass (default {default:g})")
    repetition_penalty: float = _option(1.0, ">1 discourages repeating tokens (default {default:g})")
    presence_penalty: float = _option(0.0, "OpenAI's: -2..2, >0 avoids tokens already generated")
    frequency_penalty: float = _option(0.0, "OpenAI's: -2..2, >0 avoids them per repetition")
    stop: tuple[str, ...] = _option((), "stop before TEXT (repeatable)", metavar="TEXT")
    seed: int | None = _option(None, "random seed: makes sampling repeatable")
    min_new_tokens: int = _option(
        0, "end-of-sequence is not allowed before this many new tokens", flags=(), request=None
    )
    no_repeat_ngram_size: int = _option(0, "no N-gram occurs twice (0 = off, default)", metavar="N", model_default=True)
    num_beams: int = _option(
        1, "beam search with B beams (transformers' rules; default {default}: none)", metavar="B", model_default=True
    )
    length_penalty: float = _option(
        1.0, "beams: score = logprob sum / length**this (default {default:g})", model_default=True
    )
    early_stopping: bool | str = _option(
        False,
        "beams: true stops at B finished, never only when none can win (default false: transformers' heuristic)",
        choices=(False, True, "never"),
        model_default=True,
    )
    num_return_sequences: int = _option(
        1,
        "answers to return: the K best beams, or K independent samples (default {default})",
        flags=("-n", "--num-return-sequences"),
        metavar="K",
        request="n",
    )
    logprobs: int | None = _option(
        None, "show each token's log-probability and its K most likely alternatives (0: the token's only)", metavar="K"
    )
    logit_bias: tuple[tuple[int, float], ...] = _option(
        (), "add BIAS (-100..100) to token ID's logits before sampling (repeatable; OpenAI's)", metavar="ID=BIAS"
    )
    # structured output (core/constraints.py): at most one of these
    json_schema: str | None = _option(None, "the output is JSON valid under this JSON schema (text)", metavar="JSON")
    regex: str | None = _option(None, "the output matches this regular expression", metavar="REGEX")
    choice: tuple[str, ...] = _option((), "the output is one of these strings (repeatable)", metavar="TEXT")
    grammar: str | None = _option(
        None, "the output follows this grammar: Lark (llguidance's), or llama.cpp's GBNF", metavar="GRAMMAR"
    )

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str) or stop is None:
            stop = (stop,) if stop else ()
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        if not all(isinstance(s, str) for s in self.stop):
            raise RequestError("stop must be a string or a list of strings")
        self._normalize_control()
        if self.max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not math.isfinite(self.repetition_penalty):
            raise RequestError("top_p and repetition_penalty must be finite numbers")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RequestError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_new_tokens < 0:
            raise RequestError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2 <= value <= 2:
                raise RequestError(f"{name} must be between -2 and 2, got {value}")
        self._check_search()

    def _normalize_control(self) -> None:
        """logit_bias and the constraints in one canonical form (hashable, comparable)."""
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        schema = self.json_schema
        if schema is not None and not isinstance(schema, str):
            schema = json.dumps(schema)
        if schema is not None:
            try:
                parsed = json.loads(schema)
            except ValueError as e:
                raise RequestError(f"json_schema is not valid JSON: {e}") from None
            if not isinstance(parsed, (dict, bool)):
                raise RequestError("json_schema must be a JSON object (a JSON schema)")
        object.__setattr__(self, "json_schema", schema)
        choice = self.choice
        if isinstance(choice, str) or choice is None:
            choice = (choice,) if choice else ()
        choice = tuple(choice)
        if not all(isinstance(c, str) and c for c in choice):
            raise RequestError("choice must be a list of non-empty strings")
        object.__setattr__(self, "choice", choice)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise RequestError(f"{name} must be a non-empty string")
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name)]
        if len(given) > 1:
            raise RequestError(f"{' and '.join(given)}: at most one constraint per request")

    @property
    def constrained(self) -> bool:
        """Whether the output is held to a schema, regex, choice or grammar."""
        return bool(self.json_schema or self.regex or self.choice or self.grammar)

    def _check_search(self) -> None:
        if self.no_repeat_ngram_size < 0:
            raise RequestError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        for name in ("num_beams", "num_return_sequences"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_SEQUENCES:
                raise RequestError(f"{name} must be between 1 and {MAX_SEQUENCES}, got {value}")
        if self.num_beams > 1:
            if not self.greedy:
                raise RequestError("beam search samples nothing: use temperature 0 with num_beams > 1")
            if self.num_return_sequences > self.num_beams:
                raise RequestError(
                    f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})"
                )
        if not math.isfinite(self.length_penalty):
            raise RequestError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise RequestError(f'early_stopping must be true, false or "never", got {self.early_stopping!r}')
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def beams(self) -> bool:
        return self.num_beams > 1

    @property
    def sequences(self) -> int:
        """Sequences decoded for one prompt: the beams, or the samples."""
        return self.num_beams if self.beams else self.num_return_sequences

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


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {token id: bias} (ids as strings or ints), (id, bias) pairs or "ID=BIAS" strings,
    as sorted (id, bias) pairs; each bias in -100..100."""
    if not value:
        return ()
    items = value.items() if isinstance(value, dict) else value
    pairs: dict[int, float] = {}
    try:
        for item in items:
            token, bias = item.split("=", 1) if isinstance(item, str) else item
            if isinstance(token, bool) or isinstance(bias, bool):
                raise ValueError(item)
            pairs[int(token)] = float(bias)
    except (TypeError, ValueError):
        raise RequestError('logit_bias must map token ids to numbers (as {"ID": BIAS} or ID=BIAS)') from None
    for token, bias in pairs.items():
        if token < 0:
            raise RequestError(f"logit_bias: token id {token} is negative")
        if not math.isfinite(bias) or not -100 <= bias <= 100:
            raise RequestError(f"logit_bias: the bias of token {token} must be between -100 and 100, got {bias}")
    return tuple(sorted(pairs.items()))


class GenerationKwargs(TypedDict, total=False):
    """The fields of GenerationOptions as keyword arguments (for type checkers)."""

    # Spelled out, not derived: type checkers read a TypedDict only from its class body (one built
    # from fields(GenerationOptions) at run time is opaque to them); tests/test_cli.py checks the names.
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
    no_repeat_ngram_size: int
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int
    logprobs: int | None
    logit_bias: dict[int, float] | dict[str, float] | Sequence[tuple[int, float]] | None
    json_schema: str | dict[str, Any] | None
    regex: str | None
    choice: str | Sequence[str] | None
    grammar: str | None


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (token id, logprob), best first

    def render(self, token_bytes: Callable[[int], bytes]) -> dict[str, Any]:
        """As JSON data, each token with its text (`token_bytes`: a token id's bytes, as
        `Model.token_bytes`): token_id, token, logprob, and the alternatives alike ("top")."""

        def token(t: int) -> dict[str, Any]:
            return {"token_id": t, "token": token_bytes(t).decode("utf-8", "replace")}

        top = [{**token(t), "logprob": v} for t, v in self.top]
        return {**token(self.token_id), "logprob": self.logprob, "top": top}


@dataclass
class GenerationResult:
    """One generated sequence. With num_return_sequences > 1 this is the first (the best beam,
    or sample 0) and `others` holds the rest, in order: `sequences` lists them all."""

    text: str
    token_ids: list[int]  # new tokens only (an end-of-sequence token included when produced)
    finish_reason: str  # "stop" (end of sequence or stop string) | "length"
    prompt_tokens: int
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked
    score: float | None = None  # beam search: sum of log-probs / length**length_penalty (transformers')
    index: int = 0  # position among the request's sequences
    others: list[GenerationResult] = dataclasses.field(default_factory=list)

    @property
    def sequences(self) -> list[GenerationResult]:
        return [self, *self.others]

    def render(self, token_bytes: Callable[[int], bytes] | None = None, **extra: Any) -> dict[str, Any]:
        """This sequence as JSON data (`pocketlm run --json`, batch answers, Ray rows): text, token
        ids, finish reason, prompt tokens, then `extra`, the beam score (beam search) and, given
        `token_bytes`, the log-probabilities asked for, each token with its text (TokenLogprob.render)."""
        data = {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            **extra,
        }
        if self.score is not None:
            data["score"] = self.score
        if self.logprobs is not None and token_bytes is not None:
            data["logprobs"] = [lp.render(token_bytes) for lp in self.logprobs]
        return data

    @property
    def completion_tokens(self) -> int:
        """New tokens of every returned sequence (what a usage report counts)."""
        return sum(len(r.token_ids) for r in self.sequences)

    @property
    def tokens_per_second(self) -> float:
        decode = self.seconds - self.first_token_seconds
        return (len(self.token_ids) - 1) / decode if len(self.token_ids) > 1 and decode > 0 else 0.0


@dataclass
class StreamEvent:
    """One generated token and the text it made showable (often "", for partial characters)."""

    token_id: int | None  # None for the final flush of held-back text
    text: str
    index: int = 0  # which of the request's sequences (num_return_sequences > 1)
    logprob: TokenLogprob | None = None  # when asked


class TokenStream(Iterator[StreamEvent]):
    """The events of one generation, and its result.

    `result` fills as the stream is read and is complete once it is exhausted; `close()` (or
    leaving a `with` block) stops the generation at once and frees the engine. `cancel()` may
    be called from any thread (a server noticing its client left): the generation stops at
    the next engine step, or leaves the queue if it is still waiting, and the stream ends."""

    def __init__(
        self,
        events: Generator[StreamEvent, None, None],
        result: GenerationResult,
        on_cancel: Callable[[], None] | None = None,
        on_deliver: Callable[[Callable[[Any], None]], None] | None = None,
    ):
        self._events = events
        self.result = result
        self._on_cancel = on_cancel
        self._on_deliver = on_deliver
        self.cancelled = False

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

    def cancel(self) -> None:
        """Stop from another thread; whoever reads the stream sees it end (see the class)."""
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def deliver(self, sink: Callable[[Any], None]) -> bool:
        """Instead of being iterated, hand each event to `sink` from the thread that makes it,
        then None at the end (or the exception that ended it); False when this stream can only
        be iterated (its generation runs in the reader's thread). A server uses this to take
        tokens without a thread of its own per request."""
        if self._on_deliver is None:
            return False
        self._on_deliver(sink)
        return True

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
