"""The Model every backend returns, and the generation loop they share.

A backend implements a handful of primitives (tokenize, token bytes, and either a token
source or the step primitives of `StepModel`); `Model` builds `generate`, `stream` and `score`
on them, so sampling, stop sequences, UTF-8 safe streaming and finish reasons mean the same
thing whatever engine runs underneath.

Everything about one sequence being generated lives in its `Decoding` (prompt, options,
sampler, text, result, and the engine's handle on its cache), not in the model, and the step
primitives take a list of sequences: a scheduler that decodes many sequences together drives
the same primitives.
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, overload

import numpy as np

from pocketlm.converters.core.errors import GenerationError
from pocketlm.core.generation import GenerationOptions, GenerationResult, StreamEvent, TokenLogprob, TokenStream
from pocketlm.core.sampling import Sampler
from pocketlm.core.text import TextStream

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pocketlm.core.generation import GenerationKwargs
    from pocketlm.core.scheduler import Scheduler
    from pocketlm.core.search import Search

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]  # text, or token ids
_SCHEDULER_CREATION = threading.Lock()


@dataclass
class ModelInfo:
    """What is running and why: shown by `pocketlm info` and `Model.info`."""

    path: str
    format: str  # gguf | ct2
    backend: str  # llama.cpp | ctranslate2
    device: str  # cpu | metal | cuda
    architecture: str
    quant: str
    n_ctx: int
    vocab_size: int
    threads: int
    has_tokenizer: bool
    reasons: list[str] = field(default_factory=list)
    parallel: int = 1  # sequences decoded together
    kv_cells: int = 0  # tokens the KV cache holds, all sequences together (0: the engine manages it)
    kv_bytes: int = 0  # what those tokens take (as `pocketlm info` computes it; 0: not known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Detokenizer(Protocol):
    """Incremental decoding: the bytes each new token adds, and what is held at the end."""

    def push(self, token: int) -> bytes: ...
    def flush(self) -> bytes: ...


class BytePieces:
    """Tokenizers whose tokens are byte strings (byte-level BPE): pieces just concatenate."""

    def __init__(self, piece: Callable[[int], bytes]):
        self.push = piece

    def flush(self) -> bytes:
        return b""


class Decoding:
    """One sequence being generated: its prompt and options, its sampler and the tokens it has
    seen, its text so far (stop strings, UTF-8), its result, and `slot`, the engine's handle on
    its cache (set by the backend when the sequence starts). `index` is its place among the
    sequences of its request (samples, beams); `pending` a token chosen but not yet evaluated."""

    def __init__(
        self,
        ids: list[int],
        options: GenerationOptions,
        detokenizer: Detokenizer,
        history: list[int],
        index: int = 0,
    ):
        self.ids, self.options, self.index = ids, options, index
        self.sampler = Sampler(options, index)
        self.seen = history  # what the repetition penalty looks at
        self.result = GenerationResult("", [], "length", len(ids), index=index)
        if options.logprobs is not None:
            self.result.logprobs = []
        self.started = time.perf_counter()
        self.slot: Any = None
        self.position = 0  # tokens of this sequence in the engine's cache
        self.pending: int | None = None
        self.done = False
        self._finished = False
        self._text = TextStream(list(options.stop))
        self._detok = detokenizer

    def push(self, token: int, is_end: bool, logprob: TokenLogprob | None = None) -> StreamEvent | None:
        """Record a generated token; its event, or None when it ends the sequence."""
        result = self.result
        result.token_ids.append(token)
        if result.logprobs is not None and logprob is not None:
            result.logprobs.append(logprob)
        if len(result.token_ids) == 1:
            result.first_token_seconds = time.perf_counter() - self.started
        if is_end:
            result.finish_reason, self.done = "stop", True
            return None
        event = StreamEvent(token, self._text.push(self._detok.push(token)), self.index, logprob)
        if self._text.stopped:
            result.finish_reason, self.done = "stop", True
        return event

    def finish(self) -> StreamEvent | None:
        """Release the text held back (the final event, if any) and complete the result."""
        self.done = True
        if self._finished:
            return None
        self._finished = True
        self._text.push(self._detok.flush())
        tail = self._text.finish()
        self.result.text = self._text.released
        self.result.seconds = time.perf_counter() - self.started
        return StreamEvent(None, tail, self.index) if tail else None


class Model(ABC):
    """A loaded model. Use `pocketlm.load()` to get one; close it (or use `with`) when done."""

    info: ModelInfo
    # A prompt without a clear end (final punctuation) makes some models continue the input
    # instead of answering (BLOOMZ's model card). Backends set this from the architecture.
    warn_unterminated_prompts = False
    batches_prompts = False  # generate_batch decodes several prompts together (faster than one by one)

    parallel_sequences = 1  # sequences decoded together; above 1, callers go through `scheduler`
    # Defaults from the checkpoint's generation_config.json, as GenerationOptions fields
    # (backends set it from the model's metadata); every call may override them.
    generation_defaults: dict[str, Any] = {}

    def __init__(self) -> None:
        self._lock = threading.RLock()  # the engine: one caller (or the scheduler's step) at a time
        self._scheduler: Scheduler | None = None
        self._warned_unterminated = False

    # -- what a backend provides --------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, as the Hugging Face tokenizer gives them."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens omitted)."""

    @abstractmethod
    def _generate_ids(self, seq: Decoding, max_new: int) -> Iterator[int]:
        """Yield the token ids generated for `seq` (an end-of-sequence token last, when produced)."""

    @abstractmethod
    def _detokenizer(self) -> Detokenizer:
        """A fresh incremental decoder for one generation."""

    @abstractmethod
    def _is_end(self, token: int) -> bool:
        """Whether a token ends the sequence."""

    @abstractmethod
    def _continuation_logits(self, context: list[int], continuation: list[int]) -> np.ndarray:
        """Logits rows predicting each continuation token after the context."""

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes as it appears inside a text (OpenAI's logprobs show them)."""
        try:
            return self.detokenize([token]).encode()
        except GenerationError:  # no tokenizer
            return f"<{token}>".encode()

    def _budget(self, n_prompt: int, max_new_tokens: int) -> int:
        """How many tokens may be generated after a prompt of n_prompt tokens."""
        return min(max_new_tokens, self.info.n_ctx - n_prompt)

    def _penalty_history(self, ids: list[int]) -> list[int]:
        """The tokens a repetition penalty starts from: the prompt, for a causal model."""
        return list(ids)

    def close(self) -> None:  # noqa: B027 (optional for backends: not every engine holds memory to free)
        """Free the engine's memory. The model cannot be used afterwards."""

    # -- shared API ---------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, /, **given: Any) -> GenerationOptions:
        """The options of a call: `options` when given, else the model's defaults
        (`generation_defaults`); keyword arguments override either."""
        if options is None:
            defaults = dict(self.generation_defaults)
            if given.get("temperature") and "num_beams" not in given:
                defaults.pop("num_beams", None)  # sampling asked for: the default beams give way
                defaults.pop("num_return_sequences", None)
            options = GenerationOptions(**defaults)
        return GenerationOptions.of(options, **given)

    def _check_prompt_end(self, prompt: str) -> None:
        if not self.warn_unterminated_prompts or self._warned_unterminated:
            return
        stripped = prompt.rstrip()
        if stripped and not unicodedata.category(stripped[-1]).startswith("P"):
            self._warned_unterminated = True
            log.warning(
                "the prompt does not end with punctuation; %s models may continue it instead of "
                "answering (end it with '.', '?' or ':' as in the model card's examples)",
                self.info.architecture,
            )

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            self._check_prompt_end(prompt)
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids or (isinstance(prompt, str) and not prompt):
            raise GenerationError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self.info.vocab_size - 1})")
        if len(ids) >= self.info.n_ctx:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens; the context holds {self.info.n_ctx} "
                "(load with a larger n_ctx or shorten it)"
            )
        return ids

    def _decoding(self, prompt: Prompt, options: GenerationOptions) -> Decoding:
        """A new sequence for `prompt` (checked now: errors come from the call, not the stream)."""
        ids = self._prompt_ids(prompt)
        return Decoding(ids, options, self._detokenizer(), self._penalty_history(ids))

    def _decoding_from(self, first: Decoding, index: int) -> Decoding:
        """Another sequence of `first`'s request (a sample or a beam): same prompt and options."""
        return Decoding(first.ids, first.options, self._detokenizer(), self._penalty_history(first.ids), index)

    def stream_tokens(
        self,
        prompt: Prompt,
        options: GenerationOptions | None = None,
        /,
        **kwargs: Unpack[GenerationKwargs],
    ) -> TokenStream:
        """Generate token by token: a stream of each token with the text it releases, whose
        `.result` is the whole GenerationResult once the stream is exhausted. With several
        sequences (samples, beams) each event says which (`index`); beams come at the end."""
        opts = self.options(options, **kwargs)
        if self.parallel_sequences > 1:  # decoded together with every other caller's
            return self.scheduler.stream_tokens(prompt, opts)
        return self._stream_alone(prompt, opts)

    def _stream_alone(self, prompt: Prompt, options: GenerationOptions) -> TokenStream:
        """One caller's generation, in the caller's thread."""
        seq = self._decoding(prompt, options)
        return TokenStream(self._events(seq), seq.result)

    @property
    def scheduler(self) -> Scheduler:
        """What decodes this model's callers together (created on first use, one per model)."""
        if self._scheduler is None:  # not under the engine lock: the scheduler may hold it
            with _SCHEDULER_CREATION:
                if self._scheduler is None:
                    self._scheduler = self._make_scheduler()
        return self._scheduler

    def _make_scheduler(self) -> Scheduler:
        from pocketlm.core.scheduler import Scheduler

        return Scheduler(self)  # type: ignore[arg-type]

    def _stop_scheduler(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()

    def _reservation(self, seq: Decoding, max_new: int, sequences: int = 1) -> int:
        """KV cells a request keeps for its prompt and the new tokens of its sequences."""
        return len(seq.ids) + sequences * max_new

    def _events(self, seq: Decoding) -> Generator[StreamEvent, None, None]:
        with self._lock:
            seq.started = time.perf_counter()
            budget = self._budget(len(seq.ids), seq.options.max_new_tokens)
            tokens = self._generate_ids(seq, budget) if budget > 0 else iter(())
            try:
                yield from self._render(seq, tokens)
            finally:
                close = getattr(tokens, "close", None)
                if close:
                    close()

    def _render(
        self, seq: Decoding, tokens: Iterable[int], logprobs: Sequence[TokenLogprob] | None = None
    ) -> Iterator[StreamEvent]:
        """Turn generated ids (and their logprobs, when asked) into text events: end tokens,
        stop strings, UTF-8 safety."""
        for j, token in enumerate(tokens):
            event = seq.push(token, self._is_end(token), logprobs[j] if logprobs is not None else None)
            if event is not None:
                yield event
            if seq.done:
                break
        tail = seq.finish()
        if tail is not None:
            yield tail

    def stream(
        self, prompt: Prompt, options: GenerationOptions | None = None, /, **kwargs: Unpack[GenerationKwargs]
    ) -> Iterator[str]:
        """Text increments; they never split a character and join to `generate().text`."""
        return self.stream_tokens(prompt, options, **kwargs).texts()

    @overload
    def generate(
        self, prompt: Prompt, options: GenerationOptions | None = None, /, **kwargs: Unpack[GenerationKwargs]
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        prompt: list[str] | list[Sequence[int]],
        options: GenerationOptions | None = None,
        /,
        **kwargs: Unpack[GenerationKwargs],
    ) -> list[GenerationResult]: ...

    def generate(self, prompt: Any, options: GenerationOptions | None = None, /, **kwargs: Any) -> Any:
        """Complete `prompt` (a string or token ids), or each prompt of a list of them.

        Options (a GenerationOptions, or its fields as keywords; unset ones come from the
        model's `generation_defaults`): max_new_tokens=64, temperature=0.0 (greedy), top_k=0,
        top_p=1.0, repetition_penalty=1.0, presence_penalty=0, frequency_penalty=0, stop=None,
        seed=None, min_new_tokens=0 (end of sequence is not allowed earlier; benchmarks use it
        to decode a fixed length), no_repeat_ngram_size=0, num_beams=1, length_penalty=1.0,
        early_stopping=False, num_return_sequences=1, logprobs=None. Returns a
        GenerationResult (its `.sequences` with num_return_sequences > 1), or a list of them
        for a list of prompts."""
        opts = self.options(options, **kwargs)
        if _is_batch(prompt):
            return self.generate_batch(list(prompt), opts)
        stream = self.stream_tokens(prompt, opts)
        for _ in stream:
            pass
        return stream.result

    def generate_batch(
        self, prompts: list[Prompt], options: GenerationOptions | None = None, /, **kwargs: Unpack[GenerationKwargs]
    ) -> list[GenerationResult]:
        """Complete several prompts; with parallel sequences, decoded together."""
        opts = self.options(options, **kwargs)
        if self.parallel_sequences > 1:
            return self.scheduler.generate_batch(prompts, opts)
        return [self.generate(p, opts) for p in prompts]

    def score(self, prompt: str | Sequence[int], candidates: Sequence[str | Sequence[int]]) -> list[float]:
        """Log-likelihood of each candidate answer to `prompt` (zero-shot choice tasks).

        Text candidates are tokenized as the model's tokenizer does (for T5 models that
        includes the closing </s>, as the T0 evaluation scores it)."""
        context = self._prompt_ids(prompt)
        conts = [self.tokenize(c) if isinstance(c, str) else [int(t) for t in c] for c in candidates]
        if any(not cont for cont in conts):
            raise GenerationError("a candidate is empty")
        scores = []
        for cont, rows in zip(conts, self._continuations_logits(context, conts)):
            logits = rows.astype(np.float64)
            top = logits.max(-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            scores.append(float(np.sum(logits[np.arange(len(cont)), cont] - logz)))
        return scores

    def _continuations_logits(self, context: list[int], continuations: list[list[int]]) -> list[np.ndarray]:
        """The logits rows predicting each continuation's tokens; engines that can evaluate
        them together (one shared prompt, one batch) override this."""
        return [self._continuation_logits(context, cont) for cont in continuations]

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<Model {i.architecture} {i.quant} on {i.backend}/{i.device}: {i.path}>"


def _is_batch(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], (str, list, tuple))


class StepModel(Model):
    """A model whose engine evaluates one step at a time: PocketLM samples each token itself.

    The step primitives are per sequence, and several sequences go in one engine call:
    `_admit` gives a new sequence a slot of the KV cache (and says how much of its prompt the
    slot already holds), `_evaluate` appends tokens to each of several sequences and returns
    the logits after them, `_release` frees the slot. `parallel_sequences` is how many
    sequences the cache holds at once, `kv_cells` how many tokens in all; `joins_running` says
    whether a sequence may start while others are being decoded. runtime/core/scheduler.py drives
    many sequences with these; the loop below drives one."""

    joins_running = True

    def __init__(self) -> None:
        super().__init__()
        self._freed = threading.Condition(self._lock)  # notified when a slot is released
        self._busy: dict[int, int] = {}  # slot -> KV cells reserved by its running sequence

    @property
    def batches_prompts(self) -> bool:  # type: ignore[override]
        return self.parallel_sequences > 1

    @property
    def kv_cells(self) -> int:
        return self.info.n_ctx

    @property
    def kv_cells_in_use(self) -> int:
        """KV cells reserved by running sequences (prompt and new tokens, kept from admission)."""
        return sum(list(self._busy.values()))

    def _wait_idle(self) -> None:
        """Wait (holding the engine lock) until no sequence holds a slot."""
        self._freed.wait_for(lambda: not self._busy)

    @abstractmethod
    def _admit(self, seq: Decoding, reserve: int, followers: Sequence[Decoding] = ()) -> None:
        """Give a new sequence a slot; set `seq.position` to how many of its prompt tokens the
        slot already holds. `reserve` cells (prompt and new tokens) are kept for it. Each of
        `followers` (more sequences of the same prompt) gets a slot too; they start as copies
        of `seq` (`_fork`)."""

    @abstractmethod
    def _evaluate(self, work: list[tuple[Decoding, list[int], bool]]) -> list[np.ndarray | None]:
        """Append `tokens` to each sequence at its position, all in one engine call; for each
        entry whose flag is set, the logits for the token after its last."""

    def _release(self, seq: Decoding) -> None:
        """The sequence is done: its slot may be reused (its cache may be kept for reuse).
        Called with the engine lock held; backends call this at the end of theirs."""
        self._freed.notify_all()

    def _can_admit(self, reserve: int, seq: Decoding | None = None, slots: int = 1) -> bool:
        """Whether `slots` slots and `reserve` cache cells are free now (for `seq`, when given)."""
        return True

    @abstractmethod
    def _end_ids(self) -> list[int]:
        """Every id that ends a sequence (masked before min_new_tokens)."""

    def _start(self, seq: Decoding, max_new: int = 0) -> np.ndarray:
        """Admit a sequence and evaluate its prompt: the logits for its first new token."""
        self._admit(seq, self._reservation(seq, max_new))
        try:
            logits = self._evaluate([(seq, seq.ids[seq.position :], True)])[0]
        except BaseException:
            self._release(seq)
            raise
        assert logits is not None
        return logits

    def _advance(self, seqs: list[Decoding], tokens: list[int]) -> list[np.ndarray]:
        """One new token for each sequence, in one engine call: their next logits."""
        return self._evaluate([(seq, [token], True) for seq, token in zip(seqs, tokens)])  # type: ignore[return-value]

    def _fork(self, src: Decoding, dst: Decoding) -> None:
        """`dst` (admitted with `src`) starts as a copy of `src`'s cached tokens."""
        raise GenerationError(f"{type(self).__name__} cannot decode several sequences of one prompt")

    @property
    def sequence_slots(self) -> int:
        """Sequences the engine's cache holds at once (samples and beams of requests included)."""
        return self.parallel_sequences

    def _search(self, prompt: Prompt, options: GenerationOptions) -> Search:
        """A request's decoding (checked now: errors come from the call, not the stream)."""
        from pocketlm.core.search import make_search

        seq = self._decoding(prompt, options)
        search = make_search(self, seq, max(self._budget(len(seq.ids), options.max_new_tokens), 0))
        n = len(search.seqs)
        if n > self.sequence_slots:
            raise GenerationError(f"{n} sequences asked for one prompt; this model holds {self.sequence_slots}")
        if search.reserve > self.kv_cells:
            raise GenerationError(
                f"{n} sequences of up to {search.budget} new tokens after a {len(seq.ids)}-token prompt need "
                f"{search.reserve} KV cache cells; the model holds {self.kv_cells} "
                "(load with a larger kv_cells, or ask fewer sequences or tokens)"
            )
        return search

    def _admit_search(self, search: Search) -> None:
        self._admit(search.first, search.reserve, search.seqs[1:])
        search.admitted = True

    def _run_search(self, search: Search, room: int | None = None) -> None:
        """One engine call for one request."""
        work = search.work(room)
        search.accept([(seq, logits) for (seq, _, _), logits in zip(work, self._evaluate(work))])

    def _stream_alone(self, prompt: Prompt, options: GenerationOptions) -> TokenStream:
        search = self._search(prompt, options)
        return TokenStream(self._drive(search), search.result)

    def _drive(self, search: Search) -> Generator[StreamEvent, None, None]:
        with self._lock:
            search.first.started = time.perf_counter()
            try:
                if not search.done:
                    if not self._can_admit(search.reserve, search.first, len(search.seqs)):
                        self._freed.wait_for(lambda: self._can_admit(search.reserve, search.first, len(search.seqs)))
                    self._admit_search(search)
                while not search.done:
                    self._run_search(search)
                    yield from search.events()
                if not search.admitted:  # nothing to generate
                    tail = search.first.finish()
                    if tail is not None:
                        yield tail
                yield from search.events()
            finally:
                search.close()

    def _generate_ids(self, seq: Decoding, max_new: int) -> Iterator[int]:
        raise AssertionError("StepModel decodes through runtime/core/search.py")


class Seq2Seq:
    """What encoder-decoder backends share: logits over (source, decoder ids), scoring of
    answers as decoder targets, and decoding lengths independent of the source's.

    A backend mixing this in sets `_start_token` (the decoder start token)."""

    _start_token: int
    info: ModelInfo

    def _decoder_ids(
        self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None
    ) -> tuple[list[int], list[int]]:
        src = [int(t) for t in input_ids]
        dec = [self._start_token] if decoder_input_ids is None else [int(t) for t in decoder_input_ids]
        if not src or not dec or dec[0] != self._start_token:
            raise GenerationError(f"decoder_input_ids must start with the decoder start token {self._start_token}")
        return src, dec

    def _continuation_logits(self, context: list[int], continuation: list[int]) -> np.ndarray:
        return self.logits(context, [self._start_token, *continuation])[: len(continuation)]  # type: ignore[attr-defined]

    def _budget(self, n_prompt: int, max_new_tokens: int) -> int:
        return min(max_new_tokens, self.info.n_ctx)

    def _penalty_history(self, ids: list[int]) -> list[int]:
        # transformers penalises what the decoder has seen (start token and output), not the source
        return [self._start_token]
