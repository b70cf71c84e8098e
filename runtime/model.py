"""The Model every backend returns, and the generation loop they share.

A backend implements a handful of primitives (tokenize, token bytes, prefill, step, logits);
`Model` builds `generate`, `stream` and `score` on them, so sampling, stop sequences, UTF-8
safe streaming and finish reasons mean the same thing whatever engine runs underneath.
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from convert.errors import GenerationError

from .sampling import Sampler, SamplingParams
from .text import TextStream

log = logging.getLogger(__name__)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


class Model(ABC):
    """A loaded model. Use `runtime.load()` to get one; close it (or use `with`) when done."""

    info: ModelInfo
    # BLOOMZ's model card: a prompt without a clear end (final punctuation) makes the model
    # continue the input instead of answering. Backends set this for such models.
    warn_unterminated_prompts = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._warned_unterminated = False

    # -- what a backend provides --------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, as the Hugging Face tokenizer gives them."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens omitted)."""

    @abstractmethod
    def _generate_ids(self, ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        """Yield generated token ids (an end-of-sequence token last, when produced)."""

    @abstractmethod
    def _detokenizer(self) -> Detokenizer:
        """A fresh incremental decoder for one generation."""

    @abstractmethod
    def _is_end(self, token: int) -> bool:
        """Whether a token ends the sequence."""

    @abstractmethod
    def _continuation_logits(self, context: list[int], continuation: list[int]) -> np.ndarray:
        """Logits rows predicting each continuation token after the context."""

    def _budget(self, n_prompt: int, max_new_tokens: int) -> int:
        """How many tokens may be generated after a prompt of n_prompt tokens."""
        return min(max_new_tokens, self.info.n_ctx - n_prompt)

    def close(self) -> None:
        """Free the engine's memory. The model cannot be used afterwards."""

    # -- shared API ---------------------------------------------------------------------
    def _check_prompt_end(self, prompt: str) -> None:
        if not self.warn_unterminated_prompts or self._warned_unterminated:
            return
        stripped = prompt.rstrip()
        if stripped and not unicodedata.category(stripped[-1]).startswith("P"):
            self._warned_unterminated = True
            log.warning(
                "the prompt does not end with punctuation; %s models may continue it instead of "
                "answering (end it with '.', '?' or ':' as in the model card's examples)", self.info.architecture,
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

    def stream_tokens(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        min_new_tokens: int = 0,
        _result: GenerationResult | None = None,
    ) -> Iterator[StreamEvent]:
        """Generate token by token, yielding each token with the text it releases."""
        params = _params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, min_new_tokens)
        ids = self._prompt_ids(prompt)
        result = _result or GenerationResult("", [], "length", len(ids))
        result.prompt_tokens = len(ids)
        started = time.perf_counter()
        with self._lock:
            budget = self._budget(len(ids), max_new_tokens)
            tokens = self._generate_ids(ids, params, budget) if budget > 0 else iter(())
            try:
                yield from self._render(tokens, stop, result, started)
            finally:
                close = getattr(tokens, "close", None)
                if close:
                    close()
        result.seconds = time.perf_counter() - started

    def _render(
        self, tokens: Iterable[int], stop: str | Sequence[str] | None, result: GenerationResult, started: float,
    ) -> Iterator[StreamEvent]:
        """Turn generated ids into text events: end tokens, stop strings, UTF-8 safety."""
        text = TextStream([stop] if isinstance(stop, str) else list(stop or []))
        detok = self._detokenizer()
        for token in tokens:
            result.token_ids.append(token)
            if len(result.token_ids) == 1:
                result.first_token_seconds = time.perf_counter() - started
            if self._is_end(token):
                result.finish_reason = "stop"
                break
            yield StreamEvent(token, text.push(detok.push(token)))
            if text.stopped:
                result.finish_reason = "stop"
                break
        text.push(detok.flush())
        tail = text.finish()
        if tail:
            yield StreamEvent(None, tail)
        result.text = text.released

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[str]:
        """Yield text increments; they never split a character and join to `generate().text`."""
        for event in self.stream_tokens(prompt, **kwargs):
            if event.text:
                yield event.text

    def generate(self, prompt: str | Sequence[int] | Sequence[str | Sequence[int]], **kwargs: Any) -> Any:
        """Complete `prompt` (a string or token ids), or each prompt of a list of them.

        Keyword arguments: max_new_tokens=64, temperature=0.0 (greedy), top_k=0, top_p=1.0,
        repetition_penalty=1.0, stop=None, seed=None, min_new_tokens=0 (end of sequence is
        not allowed earlier; benchmarks use it to decode a fixed length). Returns a
        GenerationResult, or a list of them for a list of prompts."""
        if _is_batch(prompt):
            return self.generate_batch(list(prompt), **kwargs)
        result = GenerationResult("", [], "length", 0)
        for _ in self.stream_tokens(prompt, _result=result, **kwargs):  # type: ignore[arg-type]
            pass
        return result

    def generate_batch(self, prompts: list[str | Sequence[int]], **kwargs: Any) -> list[GenerationResult]:
        """Complete several prompts; engines that batch (CTranslate2) run them together."""
        return [self.generate(p, **kwargs) for p in prompts]

    def score(self, prompt: str | Sequence[int], candidates: Sequence[str | Sequence[int]]) -> list[float]:
        """Log-likelihood of each candidate answer to `prompt` (zero-shot choice tasks).

        Text candidates are tokenized as the model's tokenizer does (for T5 models that
        includes the closing </s>, as the T0 evaluation scores it)."""
        context = self._prompt_ids(prompt)
        scores = []
        for cand in candidates:
            cont = self.tokenize(cand) if isinstance(cand, str) else [int(t) for t in cand]
            if not cont:
                raise GenerationError("a candidate is empty")
            logits = self._continuation_logits(context, cont).astype(np.float64)
            top = logits.max(-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            scores.append(float(np.sum(logits[np.arange(len(cont)), cont] - logz)))
        return scores

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<Model {i.architecture} {i.quant} on {i.backend}/{i.device}: {i.path}>"


def _is_batch(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], (str, list, tuple))


def _params(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
    seed: int | None, min_new_tokens: int = 0,
) -> SamplingParams:
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return SamplingParams(temperature, top_k, top_p, repetition_penalty, seed, min_new_tokens)


class StepModel(Model):
    """A model whose engine evaluates one step at a time: PocketLM samples each token itself."""

    @abstractmethod
    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Evaluate a prompt; return the logits for the token after it."""

    @abstractmethod
    def _step(self, token: int) -> np.ndarray:
        """Append one token; return the logits for the next one."""

    @abstractmethod
    def _end_ids(self) -> list[int]:
        """Every id that ends a sequence (masked before min_new_tokens)."""

    def _penalty_history(self, ids: list[int]) -> list[int]:
        """The tokens a repetition penalty starts from: the prompt, for a causal model."""
        return list(ids)

    def _generate_ids(self, ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        sampler = Sampler(params)
        seen = self._penalty_history(ids)
        logits = self._prefill(ids)
        ends = self._end_ids() if params.min_new_tokens else []
        for i in range(max_new):
            token = sampler(logits, seen, ends if i < params.min_new_tokens else ())
            yield token
            seen.append(token)
            if i + 1 < max_new and not self._is_end(token):
                logits = self._step(token)


class Seq2Seq:
    """What encoder-decoder backends share: logits over (source, decoder ids), scoring of
    answers as decoder targets, and decoding lengths independent of the source's.

    A backend mixing this in sets `_start` (the decoder start token)."""

    _start: int
    info: ModelInfo

    def _decoder_ids(self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None) -> tuple[list[int], list[int]]:
        src = [int(t) for t in input_ids]
        dec = [self._start] if decoder_input_ids is None else [int(t) for t in decoder_input_ids]
        if not src or not dec or dec[0] != self._start:
            raise GenerationError(f"decoder_input_ids must start with the decoder start token {self._start}")
        return src, dec

    def _continuation_logits(self, context: list[int], continuation: list[int]) -> np.ndarray:
        return self.logits(context, [self._start, *continuation])[: len(continuation)]  # type: ignore[attr-defined]

    def _budget(self, n_prompt: int, max_new_tokens: int) -> int:
        return min(max_new_tokens, self.info.n_ctx)

    def _penalty_history(self, ids: list[int]) -> list[int]:
        # transformers penalises what the decoder has seen (start token and output), not the source
        return [self._start]
