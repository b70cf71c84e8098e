"""The Model every backend returns, and the generation loop they share.

A backend implements a handful of primitives (tokenize, token bytes, prefill, step, logits);
`Model` builds `generate`, `stream` and `score` on them, so sampling, stop sequences, UTF-8
safe streaming and finish reasons mean the same thing whatever engine runs underneath.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from convert.errors import GenerationError

from .sampling import Sampler, SamplingParams
from .text import TextStream


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


class Model(ABC):
    """A loaded model. Use `runtime.load()` to get one; close it (or use `with`) when done."""

    info: ModelInfo

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # -- primitives a backend provides -------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, as the Hugging Face tokenizer gives them."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens omitted)."""

    @abstractmethod
    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        """float32 [len(input_ids), vocab]: next-token logits at every position."""

    @abstractmethod
    def _token_bytes(self, token: int) -> bytes:
        """The bytes a generated token contributes to the text."""

    @abstractmethod
    def _is_end(self, token: int) -> bool:
        """Whether a token ends the sequence."""

    @abstractmethod
    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Evaluate a prompt; return the logits for the token after it."""

    @abstractmethod
    def _step(self, token: int) -> np.ndarray:
        """Append one token; return the logits for the next one."""

    def close(self) -> None:
        """Free the engine's memory. The model cannot be used afterwards."""

    # -- shared API ---------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
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
        _result: GenerationResult | None = None,
    ) -> Iterator[StreamEvent]:
        """Generate token by token, yielding each token with the text it releases."""
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        ids = self._prompt_ids(prompt)
        result = _result or GenerationResult("", [], "length", len(ids))
        result.prompt_tokens = len(ids)
        sampler = Sampler(params)
        text = TextStream(stops)
        started = time.perf_counter()
        with self._lock:
            seen = list(ids)
            budget = min(max_new_tokens, self.info.n_ctx - len(ids))
            logits = self._prefill(ids) if budget > 0 else None
            for i in range(budget):
                token = sampler(logits, seen)
                result.token_ids.append(token)
                if i == 0:
                    result.first_token_seconds = time.perf_counter() - started
                if self._is_end(token):
                    result.finish_reason = "stop"
                    break
                yield StreamEvent(token, text.push(self._token_bytes(token)))
                if text.stopped:
                    result.finish_reason = "stop"
                    break
                seen.append(token)
                if i + 1 < budget:
                    logits = self._step(token)
            tail = text.finish()
            if tail:
                yield StreamEvent(None, tail)
        result.text = text.released
        result.seconds = time.perf_counter() - started

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[str]:
        """Yield text increments; they never split a character and join to `generate().text`."""
        for event in self.stream_tokens(prompt, **kwargs):
            if event.text:
                yield event.text

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerationResult:
        """Complete `prompt`. Keyword arguments: max_new_tokens=64, temperature=0.0 (greedy),
        top_k=0, top_p=1.0, repetition_penalty=1.0, stop=None, seed=None."""
        result = GenerationResult("", [], "length", 0)
        for _ in self.stream_tokens(prompt, _result=result, **kwargs):
            pass
        return result

    def score(self, prompt: str | Sequence[int], candidates: Sequence[str | Sequence[int]]) -> list[float]:
        """Log-likelihood of each candidate continuing `prompt` (zero-shot choice tasks)."""
        context = self._prompt_ids(prompt)
        scores = []
        for cand in candidates:
            cont = self.tokenize(cand) if isinstance(cand, str) else [int(t) for t in cand]
            if not cont:
                raise GenerationError("a candidate is empty")
            full = context + cont
            if len(full) > self.info.n_ctx:
                raise GenerationError(f"prompt + candidate ({len(full)} tokens) exceed the context")
            logits = self.logits(full)[len(context) - 1 : -1].astype(np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            scores.append(float(np.sum(logits[np.arange(len(cont)), cont] - logz)))
        return scores

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<Model {i.architecture} {i.quant} on {i.backend}/{i.device}: {i.path}>"
