"""The logits chain, and choosing the next token: the same rules, in one order, on every path.

`LogitsChain` holds the processors a request's options ask for, in transformers' order:
  1. bans: an end of sequence before min_new_tokens, the tokens completing a repeated n-gram
     (no_repeat_ngram_size);
  2. repetition_penalty, over the tokens seen (a causal model's prompt and new tokens, a
     seq2seq decoder's own);
  3. OpenAI's presence and frequency penalties, over the new tokens.
Sampling (`Sampler`) then applies temperature, top-k and top-p and draws (temperature 0:
greedy); beam search runs the same chain on log-probabilities, as transformers does. Every
decoding path goes through it: the samplers of step engines and of CTranslate2's
token-by-token path, and the beams. Rows of several sequences go through in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pocketlm.core.constraints import Guide
    from pocketlm.core.generation import GenerationOptions


@dataclass(slots=True)
class History:
    """What the chain looks at for one sequence: the tokens its penalties count, and where it
    is in its constraint."""

    seen: Sequence[int]  # the repetition penalty's and n-gram ban's (prompt and new tokens, causal)
    generated: Sequence[int]  # the new tokens only (min_new_tokens, OpenAI's penalties)
    guide: Guide | None = None  # the sequence's constraint (core/constraints.py)


Processor = Callable[[np.ndarray, History], np.ndarray]  # one row in, a row out (a new array when changed)


class LogitsChain:
    """The processors `options` ask for, in this order: logit_bias, the end ban before
    min_new_tokens (`end_ids`), the n-gram ban, the repetition penalty, OpenAI's penalties, the
    constraint's mask. (Temperature, top-k and top-p follow, in the `Sampler`.)"""

    def __init__(self, options: GenerationOptions, end_ids: Iterable[int] = ()):
        self.processors: list[Processor] = []
        o = options
        ends = sorted(set(end_ids))
        if o.logit_bias:
            self.processors.append(_add_bias(o.logit_bias))
        if o.min_new_tokens and ends:
            self.processors.append(_ban_early_end(ends, o.min_new_tokens))
        if o.no_repeat_ngram_size:
            self.processors.append(_ban_repeated_ngrams(o.no_repeat_ngram_size))
        if o.repetition_penalty != 1.0:
            self.processors.append(lambda row, h: penalize_repetition(row, h.seen, o.repetition_penalty))
        if o.penalizes_generated:
            self.processors.append(
                lambda row, h: penalize_openai(row, h.generated, o.presence_penalty, o.frequency_penalty)
            )
        if o.constrained:
            self.processors.append(lambda row, h: h.guide.apply(row) if h.guide is not None else row)

    def __bool__(self) -> bool:
        return bool(self.processors)

    def __call__(self, rows: np.ndarray, histories: Sequence[History]) -> np.ndarray:
        """Rows [n, vocab] (or one row [vocab]) of logits or log-probabilities, one history per
        row; the processed rows (the input is never modified)."""
        if not self.processors:
            return rows
        if rows.ndim == 1:
            return self.row(rows, histories[0])
        return np.stack([self.row(row, h) for row, h in zip(rows, histories)])

    def row(self, row: np.ndarray, history: History) -> np.ndarray:
        """One row through the chain."""
        for process in self.processors:
            row = process(row, history)
        return row


def _add_bias(pairs: tuple[tuple[int, float], ...]) -> Processor:
    ids = np.array([t for t, _ in pairs], dtype=np.intp)
    bias = np.array([b for _, b in pairs], dtype=np.float32)

    def add(row: np.ndarray, history: History) -> np.ndarray:
        inside = ids < row.shape[-1]
        row = row.copy()
        row[ids[inside]] += bias[inside].astype(row.dtype)
        return row

    return add


def _ban_early_end(end_ids: list[int], min_new: int) -> Processor:
    ends = np.asarray(end_ids, dtype=np.intp)

    def ban(row: np.ndarray, history: History) -> np.ndarray:
        if len(history.generated) >= min_new:
            return row
        if history.guide is not None and history.guide.matcher.is_accepting():
            return row  # a complete constraint may end the output
        row = row.copy()
        row[ends] = -np.inf
        return row

    return ban


def _ban_repeated_ngrams(n: int) -> Processor:
    def ban(row: np.ndarray, history: History) -> np.ndarray:
        banned = banned_ngram_tokens(history.seen, n)
        if not banned:
            return row
        row = row.copy()
        row[banned] = -np.inf
        return row

    return ban


class Sampler:
    """One sequence's choice of tokens: its chain, then temperature, top-k, top-p and a draw
    from its own random stream (a seed reproduces the output)."""

    def __init__(self, params: GenerationOptions, index: int = 0, end_ids: Iterable[int] = ()):
        """`index`: which sample of a request (sample i is seeded with seed + i)."""
        self.params = params
        self.chain = LogitsChain(params, end_ids)
        self.greedy = params.greedy
        self.rng = np.random.default_rng(None if params.seed is None else (params.seed + index) % 2**63)

    def __call__(
        self,
        logits: np.ndarray,
        seen: Sequence[int] = (),
        banned: Iterable[int] = (),
        generated: Sequence[int] = (),
        guide: Guide | None = None,
    ) -> int:
        """The next token after the chain; `banned` ids are never drawn either."""
        if self.chain.processors:
            logits = self.chain.row(logits, History(seen, generated, guide))
        if banned:
            logits = logits.copy()
            logits[list(banned)] = -np.inf
        return self.choose(logits)

    def choose(self, logits: np.ndarray) -> int:
        """A token from processed logits: argmax when greedy, else a draw after temperature,
        top-k and top-p."""
        if self.greedy:
            return int(logits.argmax())
        p = self.params
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
