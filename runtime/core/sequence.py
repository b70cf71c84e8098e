"""One sequence being generated, from its first token to its result.

A `Decoding` holds everything about one sequence: its prompt ids and options, its sampler
and the tokens its penalties count, its text so far (stop strings, UTF-8 safety), its result,
and the engine's handle on its cache (`slot`, `position`). A request (core/request.py) owns
one or several (samples, beams); engines read and set only `ids`, `slot` and `position`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pocketlm.core.generation import GenerationOptions, GenerationResult, StreamEvent, TokenLogprob

if TYPE_CHECKING:
    from pocketlm.core.constraints import Constraint
from pocketlm.core.sampling import Sampler
from pocketlm.core.text import Detokenizer, TextStream


class Ends(NamedTuple):
    """How a sequence ends: the engine's end ids (held back before min_new_tokens) and its
    test of a token (which may know more end ids than it lists)."""

    ids: tuple[int, ...] = ()
    test: Callable[[int], bool] = lambda token: False


NO_ENDS = Ends()


class Decoding:
    """One sequence: see the module docstring. `index` is its place among its request's
    sequences; `pending` a token chosen but not yet evaluated by the engine, `forced` the tokens
    its constraint forces after it (evaluated with it, handed out once evaluated)."""

    def __init__(
        self,
        ids: list[int],
        options: GenerationOptions,
        detokenizer: Detokenizer,
        history: list[int],
        ends: Ends = NO_ENDS,
        index: int = 0,
        constraint: Constraint | None = None,
    ):
        self.ids, self.options, self.index = ids, options, index
        self.ends = ends
        self.constraint = constraint
        self.guide = constraint.guide() if constraint is not None else None  # where it is in it
        self.sampler = Sampler(options, index, ends.ids)
        self.seen = history  # what the repetition penalty looks at
        self.result = GenerationResult("", [], "length", len(ids), index=index)
        if options.logprobs is not None:
            self.result.logprobs = []
        self.started = time.perf_counter()
        self.slot: Any = None
        self.position = 0  # tokens of this sequence in the engine's cache
        self.pending: int | None = None
        self.forced: list[int] = []
        self.done = False
        self.finished = False
        self.text = TextStream(list(options.stop))
        self.detokenizer = detokenizer

    def sibling(self, index: int, detokenizer: Detokenizer, history: list[int]) -> Decoding:
        """Another sequence of the same prompt and options (a sample or a beam)."""
        return Decoding(self.ids, self.options, detokenizer, history, self.ends, index, self.constraint)

    def push(self, token: int, logprob: TokenLogprob | None = None, guided: bool = False) -> StreamEvent | None:
        """Record a generated token; its event, or None when it ends the sequence. `guided`:
        the constraint has taken the token already (a forced one: the caller checks whether
        the constraint is complete once all of them are pushed)."""
        result = self.result
        result.token_ids.append(token)
        if result.logprobs is not None and logprob is not None:
            result.logprobs.append(logprob)
        if len(result.token_ids) == 1:
            result.first_token_seconds = time.perf_counter() - self.started
        if self.ends.test(token):
            result.finish_reason, self.done = "stop", True
            return None
        event = StreamEvent(token, self.text.push(self.detokenizer.push(token)), self.index, logprob)
        if self.guide is not None and not guided:
            self.guide.advance(token)
            self.check_guide()
        if self.text.stopped:
            result.finish_reason, self.done = "stop", True
        return event

    def check_guide(self) -> None:
        """End the sequence if its constraint is complete (nothing may follow)."""
        if self.guide is not None and self.guide.stopped:
            self.result.finish_reason, self.done = "stop", True

    def finish(self) -> StreamEvent | None:
        """Release the text held back (the final event, if any) and complete the result."""
        self.done = True
        if self.finished:
            return None
        self.finished = True
        self.text.push(self.detokenizer.flush())
        tail = self.text.finish()
        self.result.text = self.text.released
        self.result.seconds = time.perf_counter() - self.started
        return StreamEvent(None, tail, self.index) if tail else None

    def render(self, tokens: Iterable[int], logprobs: Sequence[TokenLogprob] | None = None) -> Iterator[StreamEvent]:
        """Events of tokens decoded elsewhere (a whole hypothesis): end ids, stop strings,
        UTF-8 safety, then the final flush."""
        for j, token in enumerate(tokens):
            event = self.push(token, logprobs[j] if logprobs is not None else None)
            if event is not None:
                yield event
            if self.done:
                break
        tail = self.finish()
        if tail is not None:
            yield tail
