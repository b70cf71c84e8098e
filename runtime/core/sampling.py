"""Choosing the next token from logits, with the same meaning on every backend.

The order and definitions follow transformers' `generate`: repetition penalty, then
temperature, then top-k, then top-p; temperature 0 means greedy. A seed makes it repeatable.
The options are a `GenerationOptions` (runtime/core/generation.py), validated where it was made.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pocketlm.core.generation import GenerationOptions


class Sampler:
    """Stateful per generation: owns the random stream so a seed reproduces the output."""

    def __init__(self, params: GenerationOptions, index: int = 0):
        """`index`: which sample of a request (sample i is seeded with seed + i)."""
        self.params = params
        self.rng = np.random.default_rng(None if params.seed is None else (params.seed + index) % 2**63)

    def __call__(
        self, logits: np.ndarray, seen: Iterable[int] = (), banned: Iterable[int] = (), generated: Sequence[int] = ()
    ) -> int:
        """The next token; `banned` ids (end of sequence before min_new_tokens) are never drawn;
        `generated` (the new tokens so far) is what OpenAI's penalties count."""
        p = self.params
        banned = list(banned)
        if p.no_repeat_ngram_size:
            banned += banned_ngram_tokens(seen, p.no_repeat_ngram_size)
        if banned:
            logits = logits.copy()
            logits[banned] = -np.inf
        if p.repetition_penalty != 1.0:
            logits = penalize_repetition(logits, seen, p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            logits = penalize_openai(logits, generated, p.presence_penalty, p.frequency_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        # shift before scaling: a tiny temperature must not overflow to inf (then NaN)
        with np.errstate(over="ignore"):  # a tiny temperature sends the others to -inf: fine
            scaled = (logits.astype(np.float64) - np.max(logits)) / p.temperature
        candidates = np.arange(scaled.size)
        if 0 < p.top_k < scaled.size:
            candidates = np.argpartition(-scaled, p.top_k - 1)[: p.top_k]
        order = candidates[np.argsort(-scaled[candidates], kind="stable")]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p, side="left")) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(order.size, p=probs)])


def banned_ngram_tokens(tokens: Iterable[int], n: int) -> list[int]:
    """transformers' no_repeat_ngram_size: the tokens that would complete an n-gram already in
    `tokens` (the prompt and new tokens of a causal model; the decoder's for a seq2seq one)."""
    seq = list(tokens)
    if n <= 0 or len(seq) < n:
        return []
    if n == 1:
        return sorted(set(seq))
    tail = seq[len(seq) - n + 1 :]
    first = tail[0]
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i] == first and seq[i : i + n - 1] == tail]


def penalize_repetition(logits: np.ndarray, seen: Iterable[int], penalty: float) -> np.ndarray:
    """transformers' rule: divide positive logits of seen tokens by the penalty, multiply negative."""
    ids = np.fromiter(set(seen), dtype=np.int64)
    if ids.size == 0:
        return logits
    out = logits.copy()
    values = out[ids]
    out[ids] = np.where(values > 0, values / penalty, values * penalty)
    return out


def penalize_openai(logits: np.ndarray, generated: Sequence[int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's rule: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counting the
    tokens generated so far (not the prompt)."""
    if not len(generated):
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    out = logits.astype(np.float32, copy=True)
    out[ids] -= counts * np.float32(frequency) + np.float32(presence)
    return out
