"""Causal GGUF models (BLOOMZ) on llama.cpp, through llama-cpp-python's C API.

The high-level `Llama` class either computes logits for every prompt token (slow: BLOOM's
output layer is half the model) or only the last; this backend asks for exactly the rows it
needs per call, samples with PocketLM's own sampler, and keeps the KV cache of earlier
sequences so a prompt that extends one only evaluates its new tokens.

The KV cache holds `n_seq` requests (one unless asked) in its slots (sequence ids; at least
MAX_SEQUENCES, for samples and beams), each slot knowing its tokens. A new request takes the
free slot whose cached tokens share the longest prefix with its prompt; its other sequences
take free slots and copy its cells (`fork`); `evaluate` runs the tokens of several
sequences in one llama.cpp batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pocketlm.backends.llama_common import LlamaSession, OwnsSession
from pocketlm.converters.architectures import get as get_architecture
from pocketlm.converters.core.errors import EngineError, GenerationError, ModelLoadError, RequestError
from pocketlm.converters.core.gguf_file import GGUFHeader
from pocketlm.core.engine import StepEngine
from pocketlm.core.sequence import Decoding
from pocketlm.core.text import BytePieces

DEFAULT_MAX_CTX = 2048


class LlamaCausalEngine(OwnsSession, StepEngine):
    """A causal (decoder-only) GGUF model such as BLOOMZ."""

    def __init__(
        self,
        path: Path,
        n_gpu_layers: int = 0,
        device: str = "cpu",
        threads: int = 1,
        n_ctx: int | None = None,
        n_batch: int = 512,
        kv_type: str | None = None,
        reasons: Sequence[str] = (),
        n_seq: int = 1,
        kv_cells: int | None = None,
        header: GGUFHeader | None = None,
    ):
        super().__init__()
        if n_seq < 1:
            raise RequestError(f"n_seq={n_seq}: the KV cache must hold at least 1 sequence")
        if kv_cells is not None and kv_cells < 1:
            raise RequestError(f"kv_cells={kv_cells}: the KV cache must hold at least 1 token")
        self._s = s = LlamaSession(
            path, n_gpu_layers, threads, n_ctx, DEFAULT_MAX_CTX, n_batch, kv_type, n_seq, kv_cells, header
        )
        if s.has_encoder:
            s.close()
            raise ModelLoadError(f"{path}: an encoder-decoder model (it runs on the seq2seq backend)")
        # Without tokenizer tables llama.cpp knows no special ids, but the converter recorded eos.
        eos = None if s.has_vocab else s.special("eos", None, None)
        self._eos_without_vocab = {eos} if eos is not None else set()
        self._ends: dict[int, bool] = {}  # token -> whether it ends generation, as met
        self._slots: list[list[int]] = [[] for _ in range(s.n_seq_max)]  # tokens in each sequence's KV cache
        self._last_used = [0] * s.n_seq_max
        self._clock = itertools.count(1)
        self.parallel_sequences = n_seq
        arch = get_architecture(s.architecture)
        self.warn_unterminated_prompts = arch is not None and arch.needs_prompt_end
        self.info = s.model_info(device, threads, reasons)

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._s.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        self._s.require_vocab()
        return b"".join(self._s.piece(int(t)) for t in ids).decode("utf-8", "replace")

    def text_tokens(self) -> list[bytes | None]:
        return self._s.text_pieces() if self._s.has_vocab else super().text_tokens()

    def token_bytes(self, token: int) -> bytes:
        return self._s.piece(token) if self._s.has_vocab else f"<{token}>".encode()

    def detokenizer(self) -> BytePieces:
        return BytePieces(self._s.piece)  # byte-level pieces; TextStream reassembles split UTF-8

    def end_ids(self) -> list[int]:
        s = self._s
        if not s.has_vocab:
            return sorted(self._eos_without_vocab)
        return sorted(t for t in {s.llama.llama_vocab_eos(s.vocab), s.llama.llama_vocab_eot(s.vocab)} if t >= 0)

    def is_end(self, token: int) -> bool:
        end = self._ends.get(token)
        if end is None:
            s = self._s
            end = self._ends[token] = (
                bool(s.llama.llama_vocab_is_eog(s.vocab, token)) if s.has_vocab else token in self._eos_without_vocab
            )
        return end

    # -- evaluation -----------------------------------------------------------------------
    def _engine(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except GenerationError:  # a failed batch clears the whole KV cache (LlamaSession)
            for cached in self._slots:
                cached.clear()
            raise

    def _forget(self, slot: int, keep: int = 0) -> None:
        self._s.clear(keep, slot)
        del self._slots[slot][keep:]

    def _take_slot(self, ids: list[int]) -> tuple[int, int]:
        """A free slot for a new sequence, and how many of its cached tokens are reusable
        (always re-evaluating at least the prompt's last token, for its logits)."""
        best, keep = -1, -1
        for slot, cached in enumerate(self._slots):
            if slot in self.busy:
                continue
            shared = 0
            for a, b in zip(cached, ids[:-1]):
                if a != b:
                    break
                shared += 1
            if shared > keep:
                best, keep = slot, shared
        if best < 0:
            raise EngineError(f"all {len(self._slots)} sequences of the KV cache are in use")
        return best, keep

    def admit(self, seq: Decoding, reserve: int, followers: Sequence[Decoding] = ()) -> None:
        slot, keep = self._take_slot(seq.ids)
        self._forget(slot, keep)
        self.busy[slot] = reserve
        for follower in followers:  # the least recently used free slots
            other = min((s for s in range(len(self._slots)) if s not in self.busy), key=lambda s: self._last_used[s])
            self._forget(other)
            self.busy[other] = 0
            follower.slot, follower.position = other, 0
        self._make_room(slot)
        seq.slot, seq.position = slot, keep

    def fork(self, src: Decoding, dst: Decoding) -> None:
        self._s.share(src.slot, dst.slot, src.position)
        self._slots[dst.slot] = self._slots[src.slot][: src.position]
        dst.position = src.position

    @property
    def kv_cells(self) -> int:
        return self._s.kv_cells

    @property
    def sequence_slots(self) -> int:
        return len(self._slots)

    def reservation(self, seq: Decoding, max_new: int, sequences: int = 1) -> int:
        return min(len(seq.ids) + max_new, self.info.n_ctx) + (sequences - 1) * max_new

    def can_admit(self, reserve: int, seq: Decoding | None = None, slots: int = 1) -> bool:
        return len(self.busy) + slots <= len(self._slots) and sum(self.busy.values()) + reserve <= self.kv_cells

    def _check_length(self, tokens: int) -> None:
        if tokens > self.info.n_ctx:
            raise RequestError(f"{tokens} tokens exceed the context of {self.info.n_ctx}")

    def _wait_for_room(self, tokens: int) -> None:
        """Wait (holding `lock`) until a slot and `tokens` cells are free beside what running
        sequences reserved: a llama.cpp batch that fails clears every sequence's cache."""
        if tokens > self.kv_cells:
            raise RequestError(f"{tokens} tokens exceed the {self.kv_cells} cells of the KV cache")
        self.freed.wait_for(lambda: self.can_admit(tokens))

    def _make_room(self, keep_slot: int) -> None:
        """Idle slots' caches give way to what running sequences have reserved."""
        idle = [s for s in range(len(self._slots)) if s not in self.busy and self._slots[s]]
        used = sum(self.busy.values()) + sum(len(self._slots[s]) for s in idle)
        for slot in sorted(idle, key=lambda s: self._last_used[s]):
            if used <= self.kv_cells:
                break
            used -= len(self._slots[slot])
            self._forget(slot)

    def evaluate(self, work: list[tuple[Decoding, list[int], bool | str]]) -> list[np.ndarray | None]:
        entries = [(seq.slot, tokens, seq.position, want) for seq, tokens, want in work]
        out = self._engine(self._s.evaluate, entries)
        for seq, tokens, _ in work:
            seq.position += len(tokens)
            self._slots[seq.slot].extend(tokens)
        return out

    def release(self, seq: Decoding) -> None:
        if self.busy.pop(seq.slot, None) is not None:  # its cache stays: a later prompt may extend it
            self._last_used[seq.slot] = next(self._clock)
            super().release(seq)

    def logits(self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None = None) -> np.ndarray:
        """float32 [len(input_ids), vocab]: next-token logits at every position."""
        if decoder_input_ids is not None:
            raise RequestError("decoder_input_ids: this is a causal model (it has no decoder of its own)")
        self._check_length(len(input_ids))
        out = np.empty((len(input_ids), self.info.vocab_size), dtype=np.float32)

        def keep(i: int, row: np.ndarray) -> None:
            out[i] = row

        self.stream_logits(input_ids, keep)
        return out

    def stream_logits(self, input_ids: Sequence[int], sink: Callable[[int, np.ndarray], None]) -> None:
        """The prompt in a slot of its own beside the running sequences (once there is room), its
        rows handed to `sink` as each llama.cpp batch returns them."""
        ids = [int(t) for t in input_ids]
        if not ids:
            return
        self._check_length(len(ids))
        with self.lock:
            self._wait_for_room(len(ids))
            slot, _ = self._take_slot(ids)
            self._forget(slot)
            self.busy[slot] = len(ids)
            self._make_room(slot)
            try:
                self._engine(self._s.evaluate, [(slot, ids, 0, "all")], sink=lambda _, i, row: sink(i, row))
            finally:
                del self.busy[slot]
            self._slots[slot] = list(ids)

    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """Each input's mean final hidden state (after `ln_f`, transformers' BloomModel
        last_hidden_state), from an embedding context of its own (llama_common.EmbeddingContext):
        generation's cache and slots are untouched, and its steps run between the calls."""
        return self._s.embed(inputs, self.lock)

    def continuation_logits(self, context: list[int], continuation: list[int]) -> np.ndarray:
        full = context + continuation
        if len(full) > self.info.n_ctx:
            raise RequestError(f"prompt + candidate ({len(full)} tokens) exceed the context of {self.info.n_ctx}")
        return self.logits(full)[len(context) - 1 : -1]

    def continuations_logits(self, context: list[int], continuations: list[list[int]]) -> list[np.ndarray]:
        """The prompt is evaluated once; the candidates continue its cache, each as a sequence of
        its own in one batch when free slots allow (else one after the other on the same slot)."""
        longest = max(len(c) for c in continuations)
        if len(context) + longest > self.info.n_ctx:
            raise RequestError(
                f"prompt + candidate ({len(context) + longest} tokens) exceed the context of {self.info.n_ctx}"
            )
        n = len(context)
        with self.lock:
            self._wait_for_room(n + longest)
            slot, keep = self._take_slot([*context, -1])  # the whole prompt may be reused, but for
            keep = min(keep, n - 1)  # its last token, whose logits predict each candidate's first
            self._forget(slot, keep)
            self.busy[slot] = n + longest
            self._make_room(slot)
            try:
                first = self._engine(self._s.evaluate, [(slot, context[keep:], keep, True)])[0]
                self._slots[slot] = list(context)
                rows = self._score_candidates(slot, n, continuations)
            finally:
                self._forget(slot, n)  # keep the prompt cached: the next question may share it
                del self.busy[slot]
                self.freed.notify_all()
        return [np.concatenate([first[None], r])[: len(c)] for c, r in zip(continuations, rows)]

    def _score_candidates(self, slot: int, n: int, continuations: list[list[int]]) -> list[np.ndarray]:
        """The logits after each candidate token but the last, the prompt being the first `n`
        tokens of `slot`'s cache."""
        tails = [c[:-1] for c in continuations]  # the last token's logits predict nothing asked
        vocab = self.info.vocab_size
        free = [s for s in range(len(self._slots)) if s not in self.busy][: len(continuations)]
        if len(continuations) > 1 and len(free) == len(continuations):
            for s, tail in zip(free, tails):
                self._forget(s)
                self._s.share(slot, s, n)  # the prompt's cells, shared: not evaluated again
                self.busy[s] = len(tail)
            try:
                entries = [(s, t, n, "all") for s, t in zip(free, tails) if t]
                out = iter(self._engine(self._s.evaluate, entries))
                return [next(out) if t else np.zeros((0, vocab), np.float32) for t in tails]
            finally:
                for s in free:
                    self._s.clear(0, s)
                    self._slots[s] = []
                    del self.busy[s]
        rows = []
        for tail in tails:
            self._s.clear(n, slot)
            rows.append(
                self._engine(self._s.evaluate, [(slot, tail, n, "all")])[0]
                if tail
                else np.zeros((0, vocab), np.float32)
            )
        return rows
