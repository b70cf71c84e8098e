"""The engine contract: what a backend implements so that `Model` can run it.

An engine is one loaded model on one inference library. `Engine` is what every engine
provides (tokens, logits, limits); an engine is also one of:

- a `StepEngine` (llama.cpp): PocketLM steps it. It keeps sequences in its cache and
  evaluates tokens of several of them in one call; the scheduler (core/scheduler.py) admits
  requests, feeds prompts and new tokens, and turns the logits into tokens (core/search.py);
- a `BatchEngine` (CTranslate2): it decodes a batch of sequences by itself, calling back with
  each new token; the scheduler forms the batches and stops each sequence on its own.

`Model` (core/model.py) is the facade users hold: it checks prompts and options and hands
requests to the scheduler it made for its engine. docs/extending.md walks through writing one.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pocketlm.converters.core.errors import GenerationError, RequestError

if TYPE_CHECKING:
    from pocketlm.core.constraints import Vocabulary
    from pocketlm.core.generation import GenerationOptions
    from pocketlm.core.sequence import Decoding
    from pocketlm.core.text import Detokenizer


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


@dataclass
class Embeddings:
    """What `Model.embed` returns: one vector per input, in order."""

    vectors: np.ndarray  # float32 [n, dim], each row L2-normalised
    tokens: int  # input tokens, all inputs together


class Engine(ABC):
    """What every engine provides. `lock` serialises calls into the library."""

    info: ModelInfo
    parallel_sequences = 1  # requests decoded together (above 1 a scheduler thread runs them)
    # A prompt without a clear end (final punctuation) makes some models continue the input
    # instead of answering (BLOOMZ's model card). Engines set this from the architecture.
    warn_unterminated_prompts = False

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._vocabulary: Vocabulary | None = None

    # -- tokens -----------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, as the Hugging Face tokenizer gives them."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens omitted)."""

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes as it appears inside a text (OpenAI's logprobs show them)."""
        try:
            return self.detokenize([token]).encode()
        except GenerationError:  # no tokenizer
            return f"<{token}>".encode()

    def text_tokens(self) -> list[bytes | None]:
        """Each token's bytes inside a text, None for a token that is not text (control,
        unknown, padding): what structured output may write with. Engines override this; the
        default takes `token_bytes` of every id but the end ids."""
        ends = set(self.end_ids())
        return [None if i in ends else self.token_bytes(i) for i in range(self.info.vocab_size)]

    def vocabulary(self) -> Vocabulary:
        """The tokens as constraints see them (core/constraints.py), built on first use."""
        with self.lock:
            if self._vocabulary is None:
                from pocketlm.core.constraints import Vocabulary

                if not self.info.has_tokenizer:
                    raise RequestError(f"{self.info.path} has no tokenizer: its output cannot be constrained")
                tokens = self.text_tokens()
                self._vocabulary = Vocabulary(tokens, self.end_ids(), self._drops_leading_space(tokens))
            return self._vocabulary

    def _drops_leading_space(self, tokens: list[bytes | None]) -> bool:
        """Whether a sequence's text loses its first token's leading space (SentencePiece):
        asked of the detokenizer with a few tokens that start with a space."""
        spaced = [i for i, t in enumerate(tokens) if t and len(t) > 1 and t[:1] == b" " and t[1:2].isalpha()][:5]
        return bool(spaced) and all(self.detokenize([i]).encode() == tokens[i][1:] for i in spaced)  # type: ignore[index]

    @abstractmethod
    def detokenizer(self) -> Detokenizer:
        """A fresh incremental decoder for one sequence."""

    @abstractmethod
    def end_ids(self) -> list[int]:
        """Every id that ends a sequence (held back before min_new_tokens)."""

    def is_end(self, token: int) -> bool:
        """Whether a token ends the sequence."""
        return token in self.end_ids()

    # -- limits -----------------------------------------------------------------------------
    def budget(self, n_prompt: int, max_new_tokens: int) -> int:
        """How many tokens may be generated after a prompt of n_prompt tokens."""
        return min(max_new_tokens, self.info.n_ctx - n_prompt)

    def penalty_history(self, ids: list[int]) -> list[int]:
        """The tokens a repetition penalty starts from: the prompt, for a causal model."""
        return list(ids)

    # -- logits -----------------------------------------------------------------------------
    @abstractmethod
    def logits(self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None = None) -> np.ndarray:
        """float32 [n, vocab]: the next-token logits at each position of `input_ids` (causal),
        or of `decoder_input_ids` after the source `input_ids` (encoder-decoder)."""

    def stream_logits(self, input_ids: Sequence[int], sink: Callable[[int, np.ndarray], None]) -> None:
        """`logits(input_ids)` a row at a time: `sink(i, row)` for each position, the row valid
        only during the call. Engines that get rows in parts override it, so that a long prompt's
        [n, vocab] (a megabyte per token on a 250k vocabulary) is never held whole."""
        for i, row in enumerate(self.logits(input_ids)):
            sink(i, row)

    @abstractmethod
    def continuation_logits(self, context: list[int], continuation: list[int]) -> np.ndarray:
        """The logits rows predicting each continuation token after the context."""

    def continuations_logits(self, context: list[int], continuations: list[list[int]]) -> list[np.ndarray]:
        """The same for several continuations; engines that evaluate them together (one shared
        prompt, one batch) override this."""
        return [self.continuation_logits(context, c) for c in continuations]

    # -- embeddings -------------------------------------------------------------------------
    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """[n, dim]: the mean over each input's tokens of the model's final hidden states (a
        causal model's last layer after its final norm; an encoder-decoder's encoder output),
        not normalised. `inputs` are checked by Model.embed (non-empty, within the context).
        Engines that can compute them override this, evaluating inputs together."""
        raise RequestError(
            f"the {self.info.backend} engine cannot compute embeddings: load a GGUF file (llama.cpp computes them)"
        )

    def close(self) -> None:  # noqa: B027 (optional: not every engine holds memory to free)
        """Free the engine's memory. It cannot be used afterwards."""


class StepEngine(Engine):
    """An engine PocketLM steps, one engine call per step for all running sequences.

    Each sequence (`Decoding`) gets a place in the engine's cache when admitted (`admit`
    sets its `slot` and how much of its prompt is already cached); `evaluate` appends tokens
    to several sequences in one call and returns the logits asked for; `fork` starts a
    sequence as a copy of another's cached tokens (samples and beams of one prompt);
    `release` frees its place. `busy` maps each admitted slot to the KV cells reserved for it;
    `freed` is notified (under `lock`) when a slot is released."""

    joins_running = True  # a sequence may start while others are being decoded

    def __init__(self) -> None:
        super().__init__()
        self.freed = threading.Condition(self.lock)
        self.busy: dict[int, int] = {}

    @property
    def kv_cells(self) -> int:
        """Tokens the cache holds, all sequences together."""
        return self.info.n_ctx

    @property
    def kv_cells_in_use(self) -> int:
        """KV cells reserved by running sequences (prompt and new tokens, kept from admission)."""
        return sum(list(self.busy.values()))

    @property
    def sequence_slots(self) -> int:
        """Sequences the cache holds at once (samples and beams of requests included)."""
        return self.parallel_sequences

    def reservation(self, seq: Decoding, max_new: int, sequences: int = 1) -> int:
        """KV cells a request keeps for its prompt and the new tokens of its sequences."""
        return len(seq.ids) + sequences * max_new

    def can_admit(self, reserve: int, seq: Decoding | None = None, slots: int = 1) -> bool:
        """Whether `slots` slots and `reserve` cache cells are free now (for `seq`, when given)."""
        return True

    @abstractmethod
    def admit(self, seq: Decoding, reserve: int, followers: Sequence[Decoding] = ()) -> None:
        """Give a new sequence a slot; set `seq.position` to how many of its prompt tokens the
        slot already holds. `reserve` cells are kept for it. Each of `followers` (more
        sequences of the same prompt) gets a slot too, to become a copy of `seq` (`fork`)."""

    @abstractmethod
    def evaluate(self, work: list[tuple[Decoding, list[int], bool | str]]) -> list[np.ndarray | None]:
        """Append `tokens` to each sequence at its position, all in one engine call; for each
        entry whose flag is True, the logits for the token after its last ([vocab]); "all": the
        logits after each of its tokens ([n, vocab]: tokens a constraint forced, whose
        log-probabilities were asked)."""

    def fork(self, src: Decoding, dst: Decoding) -> None:
        """`dst` (admitted with `src`) starts as a copy of `src`'s cached tokens."""
        raise RequestError(f"{type(self).__name__} cannot decode several sequences of one prompt")

    def release(self, seq: Decoding) -> None:
        """The sequence is done: its slot may be reused (its cache may be kept for reuse).
        Called with `lock` held; engines call this at the end of theirs."""
        self.freed.notify_all()

    def wait_idle(self) -> None:
        """Wait (holding `lock`) until no sequence holds a slot."""
        self.freed.wait_for(lambda: not self.busy)


class BatchEngine(Engine):
    """An engine that decodes whole batches by itself (CTranslate2)."""

    @abstractmethod
    def batch_key(self, options: GenerationOptions) -> Hashable | None:
        """Requests with equal keys may be decoded in one batch; None: this request is decoded
        alone, whole, by `decode_group` (several sequences, log-probabilities, ...)."""

    @abstractmethod
    def decode_batch(self, seqs: list[Decoding], budgets: list[int], on_token: Callable[[int, int], bool]) -> None:
        """Decode several sequences in one batch, handing each new token to
        `on_token(index, token)` as it comes; a True answer stops that sequence."""

    @abstractmethod
    def decode_group(self, seq: Decoding, budget: int) -> list[tuple[list[int], float | None]]:
        """A request decoded whole: each of its sequences' token ids (an end id included when
        produced) and score (beams), in order."""


class Seq2Seq:
    """What encoder-decoder engines share: logits over (source, decoder ids), scoring of
    answers as decoder targets, and decoding lengths independent of the source's.

    An engine mixing this in sets `start_token` (the decoder start token)."""

    start_token: int
    info: ModelInfo

    def decoder_ids(
        self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None
    ) -> tuple[list[int], list[int]]:
        """The source and the decoder ids (default: the start token), checked."""
        src = [int(t) for t in input_ids]
        dec = [self.start_token] if decoder_input_ids is None else [int(t) for t in decoder_input_ids]
        if not src or not dec or dec[0] != self.start_token:
            raise RequestError(f"decoder_input_ids must start with the decoder start token {self.start_token}")
        return src, dec

    def continuation_logits(self, context: list[int], continuation: list[int]) -> np.ndarray:
        return self.logits(context, [self.start_token, *continuation])[: len(continuation)]  # type: ignore[attr-defined]

    def budget(self, n_prompt: int, max_new_tokens: int) -> int:
        return min(max_new_tokens, self.info.n_ctx)

    def penalty_history(self, ids: list[int]) -> list[int]:
        # transformers penalises what the decoder has seen (start token and output), not the source
        return [self.start_token]
