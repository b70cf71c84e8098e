"""How a request's logits become tokens: samples and beam search, with transformers' rules.

A request decodes `options.sequences` sequences of one prompt: independent samples (one,
usually) or the beams of a beam search. On engines that PocketLM steps itself (`StepEngine`)
they are sequences of the engine's KV cache: the first holds the prompt, the others start as
copies of its cells (`fork`: llama.cpp shares them, nothing is evaluated again). A `Search`
says what its sequences evaluate next (`work`) and turns the logits that come back into
tokens and events (`accept`); the scheduler (core/scheduler.py) drives them, for one caller
or many.

`BeamState` is the beam search itself, on log-probabilities, engine-free: the candidates, the
finished hypotheses and the stopping rule of transformers' `generate` (num_beams,
length_penalty, early_stopping False/True/"never"). Engines that search by themselves
(CTranslate2) use theirs; the differences are in README.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pocketlm.core.constraints import fill_masks
from pocketlm.core.generation import GenerationOptions, GenerationResult, StreamEvent, TokenLogprob
from pocketlm.core.sampling import History, LogitsChain

if TYPE_CHECKING:
    from pocketlm.core.constraints import Guide
    from pocketlm.core.engine import StepEngine
    from pocketlm.core.sequence import Decoding


def log_softmax(logits: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Log-probabilities of a logits row (float64: what logprobs report; beam search, like
    transformers', works in float32, which halves its cost over a 250k vocabulary)."""
    x = logits.astype(dtype, copy=True)
    x -= x.max()
    x -= np.log(np.exp(x).sum(dtype=np.float64)).astype(dtype)
    return x


def token_logprob(logprobs: np.ndarray, token: int, top: int) -> TokenLogprob:
    """A token's log-probability in a row of them, with the `top` most likely tokens."""
    best: list[tuple[int, float]] = []
    if top:
        ids = np.argpartition(-logprobs, top - 1)[:top] if top < logprobs.size else np.arange(logprobs.size)
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        best = [(int(i), float(logprobs[i])) for i in ids]
    return TokenLogprob(int(token), float(logprobs[token]), best)


def logprobs_of(rows: np.ndarray, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Each token's TokenLogprob from the logits rows that predicted it (teacher forcing)."""
    return [token_logprob(log_softmax(row), int(t), top) for row, t in zip(rows, tokens)]


# -- beam search ----------------------------------------------------------------------------
@dataclass
class Hypothesis:
    """A beam: its new tokens, the sum of their (processed) log-probabilities, and, when asked,
    each token's log-probability under the model."""

    tokens: list[int]
    score: float
    logprobs: list[TokenLogprob] | None = None
    normalized: float = 0.0  # once finished: score / length**length_penalty


@dataclass
class BeamState:
    """transformers' beam search (generation/utils.py `_beam_search`, 5.x), one prompt.

    Each step takes the processed log-probabilities of every running beam, keeps the top
    (1 + number of end ids) x num_beams candidates, continues the best num_beams that did not
    end, and files those among the best num_beams that ended (end id, or the length budget)
    as finished, scored sum / length**length_penalty (length: new tokens, the end one
    included). It stops when early_stopping is True and num_beams are finished, or when the
    best running beam cannot beat the worst finished one (early_stopping False: judged at the
    current length; "never": at the longest possible)."""

    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    budget: int  # new tokens at most
    end_ids: frozenset[int]
    running: list[Hypothesis] = field(default_factory=lambda: [Hypothesis([], 0.0)])
    finished: list[Hypothesis] = field(default_factory=list)
    length: int = 0  # new tokens of the running beams
    improvable: bool = True
    done: bool = False

    def step(
        self, rows: Sequence[np.ndarray], raw: list[np.ndarray] | None = None, top: int = 0
    ) -> list[tuple[int, int]]:
        """Advance by one token. `rows` (one [vocab] row per running beam) are the processed
        log-probabilities of the running beams (`raw`: the model's own, for logprobs). Returns, for each new running
        beam, (index of the beam it continues, its new token)."""
        vocab = len(rows[0])
        keep = min(max(2, 1 + len(self.end_ids)) * self.num_beams, vocab)
        # the best `keep` of all beams are among each beam's best `keep` (a few argpartitions
        # of one row are much cheaper than one of all of them)
        pool_beam, pool_token, pool_score = [], [], []
        for parent, (row, beam) in enumerate(zip(rows, self.running)):
            tokens = np.argpartition(-row, keep - 1)[:keep] if keep < vocab else np.arange(vocab)
            pool_beam += [parent] * len(tokens)
            pool_token += tokens.tolist()
            pool_score += (row[tokens].astype(np.float64) + beam.score).tolist()
        order = sorted(range(len(pool_score)), key=lambda i: (-pool_score[i], pool_beam[i] * vocab + pool_token[i]))
        last = self.length + 1 >= self.budget
        candidates = []
        for rank, i in enumerate(order[:keep]):
            score, parent, token = pool_score[i], pool_beam[i], pool_token[i]
            if score == -np.inf:
                break
            candidates.append((rank, parent, token, score, last or token in self.end_ids))

        def extend(parent: int, token: int, score: float) -> Hypothesis:
            beam = self.running[parent]
            logprobs = None
            if raw is not None and beam.logprobs is not None:
                logprobs = [*beam.logprobs, token_logprob(raw[parent], token, top)]
            return Hypothesis([*beam.tokens, token], score, logprobs)

        full = len(self.finished) >= self.num_beams
        if self.improvable and not (full and self.early_stopping is True):
            scale = (self.length + 1) ** self.length_penalty
            for rank, parent, token, score, ended in candidates:
                if ended and rank < self.num_beams:
                    hyp = extend(parent, token, score)
                    hyp.normalized = score / scale
                    self.finished.append(hyp)
            self.finished.sort(key=lambda h: -h.normalized)  # stable: earlier ones win ties
            del self.finished[self.num_beams :]
        continuing = [c for c in candidates if not c[4]][: self.num_beams]
        self.running = [extend(parent, token, score) for _, parent, token, score, _ in continuing]
        self.length += 1
        full = len(self.finished) >= self.num_beams
        if self.running and self.improvable and full:
            best_length = self.length
            if self.early_stopping == "never" and self.length_penalty > 0:
                best_length = self.budget
            best = self.running[0].score / best_length**self.length_penalty
            self.improvable = best > min(h.normalized for h in self.finished)
        self.done = not self.running or not self.improvable or (full and self.early_stopping is True)
        return [(parent, token) for _, parent, token, _, _ in continuing]

    def best(self, n: int) -> list[Hypothesis]:
        return self.finished[:n]


# -- requests on a StepEngine ----------------------------------------------------------------
class Search:
    """How one request decodes on a StepEngine: its sequences (admitted together; the first
    holds the prompt), what they evaluate next and what their logits become.

    `events()` hands out what is ready for the caller; `done` is set when every sequence has
    finished, and `close()` frees whatever the engine still holds for it."""

    def __init__(self, engine: StepEngine, first: Decoding, budget: int):
        self.engine, self.first, self.budget = engine, first, budget
        self.options: GenerationOptions = first.options
        self.result = first.result
        n = self.options.sequences
        self.seqs = [first, *(self.sibling(i) for i in range(1, n))]
        self.reserve = engine.reservation(first, budget, n)
        self.prefilled = False
        self.done = budget <= 0
        self.started = first.started
        self.out: list[StreamEvent] = []

    def sibling(self, index: int) -> Decoding:
        """Sequence `index` of this request (a sample or a beam)."""
        return self.first.sibling(index, self.engine.detokenizer(), self.engine.penalty_history(self.first.ids))

    # -- what the engine runs ---------------------------------------------------------------
    def prefill(self, room: int | None) -> tuple[Decoding, list[int], bool] | None:
        """The next part of the prompt (at most `room` tokens), or None once it is read."""
        first = self.first
        if self.prefilled or self.done:
            return None
        rest = first.ids[first.position :]
        if room is not None:
            if room <= 0:
                return None
            rest = rest[:room]
        return first, rest, first.position + len(rest) == len(first.ids)

    def decode(self) -> list[tuple[Decoding, list[int], bool | str]]:
        """One token for each running sequence (and the tokens its constraint forces after it:
        the logits after each of them when it asks for log-probabilities)."""
        return [
            (seq, [seq.pending, *seq.forced], "all" if seq.forced and seq.result.logprobs is not None else True)
            for seq in self.seqs
            if seq.pending is not None
        ]

    def work(self, room: int | None = None) -> list[tuple[Decoding, list[int], bool | str]]:
        part = self.prefill(room)
        return [part] if part is not None else self.decode()

    def accept(self, outputs: list[tuple[Decoding, np.ndarray | None]]) -> None:
        """The engine evaluated this request's work: `outputs` pairs each entry's sequence with
        its logits (None for a prompt chunk that is not the last)."""
        for seq, _ in outputs:
            seq.pending = None
        rows = [(seq, logits) for seq, logits in outputs if logits is not None]
        if not rows:
            return
        if not self.prefilled:
            self.prefilled = True
            self.started = time.perf_counter()
        self._accept(rows)

    def _accept(self, rows: list[tuple[Decoding, np.ndarray]]) -> None:
        raise NotImplementedError

    def events(self) -> list[StreamEvent]:
        out, self.out = self.out, []
        return out

    def guides(self) -> list[Guide]:
        """The constraint followers whose masks this request's next logits need."""
        return [seq.guide for seq in self.seqs if seq.guide is not None and seq.pending is not None]

    def admit(self) -> None:
        """Give the request's sequences their places in the engine (called with its lock)."""
        self.engine.admit(self.first, self.reserve, self.seqs[1:])

    def release(self, seq: Decoding) -> None:
        """Free a sequence's place in the engine (once; a sequence never admitted has none)."""
        if seq.slot is not None:
            self.engine.release(seq)
            seq.slot = None

    def close(self) -> None:
        """Free every sequence still in the engine."""
        for seq in self.seqs:
            self.release(seq)
        self.done = True


class Sampling(Search):
    """Independent samples of one prompt (one, usually), each with its own sampler: sample i
    is seeded with seed + i, so sample 0 is what a request for one sample gives."""

    def __init__(self, engine: StepEngine, first: Decoding, budget: int):
        super().__init__(engine, first, budget)
        self.result.others = [seq.result for seq in self.seqs[1:]]

    def _accept(self, rows: list[tuple[Decoding, np.ndarray]]) -> None:
        for seq, logits in rows:
            if seq.forced:
                logits = self._hand_out_forced(seq, logits)
                if logits is None:
                    continue
            targets = [seq]
            if seq is self.first and len(self.seqs) > 1 and not self.first.result.token_ids:
                for other in self.seqs[1:]:  # every sample starts from the prompt's cells
                    self.engine.fork(self.first, other)
                targets = self.seqs
            for target in targets:
                self._sample(target, logits)
        if all(s.done for s in self.seqs):
            self.done = True

    def _sample(self, seq: Decoding, logits: np.ndarray) -> None:
        options = seq.options
        generated = len(seq.result.token_ids)
        token = seq.sampler(logits, seq.seen, generated=seq.result.token_ids, guide=seq.guide)
        logprob = token_logprob(log_softmax(logits), token, options.logprobs) if options.logprobs is not None else None
        seq.seen.append(token)
        event = seq.push(token, logprob)
        if event is not None:
            self.out.append(event)
        if seq.done or generated + 1 >= self.budget:
            self._end(seq)
            return
        seq.pending = token
        if seq.guide is not None:
            self._force(seq, self.budget - generated - 1)

    def _force(self, seq: Decoding, room: int) -> None:
        """Take the tokens the constraint forces next (at most `room`): they need no choice, so
        they are evaluated with the pending token in one call instead of one call each. When
        they complete the constraint and no log-probability is asked, they are handed out now."""
        forced = seq.guide.forced()[:room] if seq.guide is not None else []
        if not forced:
            return
        for token in forced:
            seq.guide.advance(token)  # type: ignore[union-attr]
        seq.forced = forced
        if seq.guide.stopped and seq.result.logprobs is None:  # type: ignore[union-attr]
            seq.pending = None
            self._hand_out_forced(seq, None)

    def _hand_out_forced(self, seq: Decoding, logits: np.ndarray | None) -> np.ndarray | None:
        """Hand out the forced tokens, evaluated (`logits`: the rows after each when
        log-probabilities are asked, else the last); the row to sample the next token from,
        or None when the sequence ended."""
        forced, seq.forced = seq.forced, []
        top = seq.options.logprobs
        for i, token in enumerate(forced):
            logprob = None
            if top is not None and logits is not None:
                logprob = token_logprob(log_softmax(logits[i]), token, top)
            seq.seen.append(token)
            event = seq.push(token, logprob, guided=True)
            if event is not None:
                self.out.append(event)
            if seq.done:
                self._end(seq)
                return None
        seq.check_guide()
        if seq.done or len(seq.result.token_ids) >= self.budget:  # `forced` fits the budget
            self._end(seq)
            return None
        if logits is None:
            return None
        return logits[-1] if logits.ndim == 2 else logits

    def _end(self, seq: Decoding) -> None:
        tail = seq.finish()
        if tail is not None:
            self.out.append(tail)
        self.release(seq)


class Beams(Search):
    """Beam search on the engine's sequences: each step every beam evaluates its new token in
    one batch; a beam that continues another takes over that one's sequence, or a copy of its
    cells (`fork`) in the sequence of a beam that was dropped."""

    def __init__(self, engine: StepEngine, first: Decoding, budget: int):
        super().__init__(engine, first, budget)
        o = self.options
        self.state = BeamState(o.num_beams, o.length_penalty, o.early_stopping, budget, frozenset(engine.end_ids()))
        self.chain = LogitsChain(o, engine.end_ids())  # transformers' processors, on log-probabilities
        self.state.running = [Hypothesis([], 0.0, [] if o.logprobs is not None else None)]
        self.holders: list[Decoding] = [first]  # the sequence each running beam is in
        self.history = list(first.seen)  # what penalties see before the new tokens
        self.beam_guides: list[Guide | None] = [first.guide]  # each running beam's place in the constraint

    def _accept(self, rows: list[tuple[Decoding, np.ndarray]]) -> None:
        o = self.options
        by_seq = {id(seq): logits for seq, logits in rows}
        logits = [by_seq[id(seq)] for seq in self.holders]
        # transformers' processors run on the log-probabilities in beam search
        logprobs = np.stack([log_softmax(lg, np.float32) for lg in logits])
        guides = self.beam_guides if self.first.guide is not None else [None] * len(self.holders)
        fill_masks([g for g in guides if g is not None])
        histories = [History(s.seen, b.tokens, g) for s, b, g in zip(self.holders, self.state.running, guides)]
        processed = list(self.chain(logprobs, histories))
        raw = [log_softmax(lg) for lg in logits] if o.logprobs is not None else None
        choices = self.state.step(processed, raw, o.logprobs or 0)
        if self.first.guide is not None:
            self.beam_guides = [self._continued(self.beam_guides[parent], token) for parent, token in choices]
        if self.state.done:
            self._finish()
            return
        self._reassign(choices)

    @staticmethod
    def _continued(guide: Guide | None, token: int) -> Guide | None:
        if guide is None:
            return None
        twin = guide.copy()
        twin.advance(token)
        return twin

    def guides(self) -> list[Guide]:
        return [g for g in self.beam_guides if g is not None] if self.prefilled else []

    def _reassign(self, choices: list[tuple[int, int]]) -> None:
        """Put each new beam in a sequence holding its parent's cells."""
        parents = self.holders
        kept: dict[int, int] = {}  # parent index -> new beam index that keeps its sequence
        for k, (parent, _) in enumerate(choices):
            kept.setdefault(parent, k)
        spare = [s for i, s in enumerate(parents) if i not in kept]
        spare += [s for s in self.seqs if all(s is not p for p in parents)]
        holders: list[Decoding] = []
        for k, (parent, _) in enumerate(choices):
            if kept[parent] == k:
                seq = parents[parent]
            else:
                seq = spare.pop()
                self.engine.fork(parents[parent], seq)
            holders.append(seq)
        for seq, (_, token), beam in zip(holders, choices, self.state.running):
            seq.pending = token
            seq.seen = [*self.history, *beam.tokens]
        self.holders = holders

    def _finish(self) -> None:
        """Release the sequences and render the best hypotheses as results and events."""
        self.close()
        o = self.options
        best = self.state.best(o.num_return_sequences)
        results: list[GenerationResult] = []
        for i, hyp in enumerate(best):
            seq = self.first if i == 0 else self.sibling(i)
            seq.started = self.first.started
            self.out += seq.render(hyp.tokens, hyp.logprobs)
            seq.result.score = hyp.normalized
            seq.result.first_token_seconds = self.started - self.first.started
            results.append(seq.result)
        self.result.others = results[1:]
        self.done = True


def make_search(engine: StepEngine, first: Decoding, budget: int) -> Search:
    return (Beams if first.options.beams else Sampling)(engine, first, budget)
