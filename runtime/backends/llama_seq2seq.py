"""Encoder-decoder GGUF models (llama.cpp's `t5`: T5, Flan-T5, mT5/mT0, T0) on llama.cpp.

llama-cpp-python's high-level `Llama` class cannot run an encoder, so this backend uses the
C API: `llama_encode` runs the encoder over the source once (llama.cpp keeps its output for
cross-attention), then `llama_decode` extends the decoder one token at a time from the
decoder start token, with PocketLM's own sampler choosing each token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pocketlm.backends.llama_common import LlamaSession, OwnsSession
from pocketlm.converters.core.errors import EngineError, ModelLoadError, RequestError
from pocketlm.converters.core.gguf_file import GGUFHeader, TensorEntry
from pocketlm.converters.core.gguf_split import ModelHeader, read_model_header
from pocketlm.core.engine import Seq2Seq, StepEngine
from pocketlm.core.sequence import Decoding
from pocketlm.core.text import BytePieces
from pocketlm.core.tokenizer import IncrementalDecoder

DEFAULT_MAX_CTX = 1024  # source tokens and decoder tokens; capped by the model's training length


def lacks_output_scale(header: GGUFHeader, path: Path) -> bool:
    """Whether a GGUF is a tied T5 that another converter wrote without the d_model**-0.5 output
    scale transformers applies (llama.cpp's own `convert_hf_to_gguf.py` writes such files).

    transformers scales a tied T5's decoder output by d_model**-0.5 before the head (original T5,
    whose config has no `tie_word_embeddings: false`; transformers 5 records the choice as
    `scale_decoder_outputs`). llama.cpp's graph never scales, and its converter writes the head
    as the checkpoint holds it: no `output` when there is no lm_head.weight (how transformers
    saves a tied T5), a copy of the embedding when a pytorch_model.bin carries the tied
    lm_head.weight; it keeps neither config key. So the rule: architecture t5, not written by
    PocketLM (whose converter folds the scale into `output` and writes pocketlm.converter), and
    no `output` or one byte-identical to `token_embd`. Such a file cannot tell original T5 from
    a tied checkpoint saved unscaled (transformers 5 with `scale_decoder_outputs: false`, as from
    a T5 v1.1 config, or a tied mT5, which transformers 5 never scales): those get the scale too,
    and `output_scale=1.0` at load undoes it."""
    if header.architecture != "t5" or "pocketlm.converter" in header.metadata:
        return False
    tensors = {t.name: t for t in header.tensors}
    embedding, head = tensors.get("token_embd.weight"), tensors.get("output.weight")
    if embedding is None:
        return False
    if head is None:
        return True
    files = (header.file_of(embedding), header.file_of(head)) if isinstance(header, ModelHeader) else (path, path)
    return _same_data(files, embedding, head)


def output_scale_reason(scale: float) -> str:
    return (
        f"output scaled by d_model**-0.5 ({scale:.4g}): a tied T5 written by llama.cpp's converter omits it "
        "(load with output_scale=1.0 if the checkpoint had scale_decoder_outputs: false)"
    )


def _same_data(files: tuple[Path, Path], a: TensorEntry, b: TensorEntry, chunk: int = 1 << 22) -> bool:
    """Whether tensors `a` and `b` (in files[0] and files[1]: split files hold their own) hold the same bytes."""
    if (a.type, a.shape, a.nbytes) != (b.type, b.shape, b.nbytes):
        return False
    with open(files[0], "rb") as fa, open(files[1], "rb") as fb:
        for lo in range(0, a.nbytes, chunk):
            n = min(chunk, a.nbytes - lo)
            fa.seek(a.offset + lo)
            fb.seek(b.offset + lo)
            if fa.read(n) != fb.read(n):
                return False
    return True


class _LlamaText:
    """The model's tokenize/detokenize as a pocketlm.core.tokenizer Tokenizer (for IncrementalDecoder)."""

    def __init__(self, model: LlamaSeq2SeqEngine):
        self.encode, self.decode = model.tokenize, model.detokenize


class LlamaSeq2SeqEngine(OwnsSession, Seq2Seq, StepEngine):
    """An encoder-decoder GGUF model. `logits()` takes source ids and decoder ids, like the
    CTranslate2 backend; the decoder's length does not depend on the source's."""

    def __init__(
        self,
        path: Path,
        n_gpu_layers: int = 0,
        device: str = "cpu",
        threads: int = 1,
        n_ctx: int | None = None,
        reasons: Sequence[str] = (),
        n_seq: int = 1,
        kv_cells: int | None = None,
        output_scale: float | None = None,
        header: GGUFHeader | None = None,
    ):
        """`output_scale` multiplies every logit (None: d_model**-0.5 for a tied T5 written
        without it, see `lacks_output_scale`, else 1); `header` is the file's, when read."""
        super().__init__()
        if n_seq < 1:
            raise RequestError(f"n_seq={n_seq}: the KV cache must hold at least 1 sequence")
        # The encoder takes every source of a cohort in one micro-batch: the batch is the context.
        self._s = s = LlamaSession(
            path,
            n_gpu_layers,
            threads,
            n_ctx,
            DEFAULT_MAX_CTX,
            n_batch=None,
            n_seq=n_seq,
            kv_cells=kv_cells,
            header=header,
        )
        if not s.has_encoder:
            s.close()
            raise ModelLoadError(f"{path}: not an encoder-decoder model (load it with the causal llama.cpp backend)")
        self._eos = s.special("eos", s.llama.llama_vocab_eos, 1)
        start = s.llama.llama_model_decoder_start_token(s.model)
        self.start_token = start if start >= 0 else s.special("pad", s.llama.llama_vocab_pad, 0)
        self._unencoded: set[int] = set()  # admitted slots whose source awaits the encoder
        self._followers: dict[int, list[int]] = {}  # slot -> slots of more sequences of its source
        self._cohort_sources = 0  # source tokens of the sequences encoded together
        self.parallel_sequences = n_seq
        if output_scale is None:  # the header matters only for a T5 PocketLM did not write
            foreign_t5 = s.architecture == "t5" and s.meta("pocketlm.converter") is None
            output_scale = 1.0
            if foreign_t5 and lacks_output_scale(header or read_model_header(path), Path(path)):
                output_scale = s.llama.llama_model_n_embd(s.model) ** -0.5
                reasons = [*reasons, output_scale_reason(output_scale)]
        elif output_scale != 1.0:
            reasons = [*reasons, f"output scaled by {output_scale:.4g} (given)"]
        self.output_scale = float(output_scale)
        self.info = s.model_info(device, threads, reasons)

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Ids as Hugging Face's T5 tokenizer gives them, </s> appended (the GGUF's add_eos)."""
        return self._s.tokenize(text)

    def _shown(self, token: int) -> bool:
        """Whether decoding keeps a token: special, unknown and padding ids are skipped, as
        Hugging Face's decode(skip_special_tokens=True) does."""
        llama = self._s.llama
        if not 0 <= token < self._s.n_vocab:
            return False
        hidden = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_UNKNOWN | llama.LLAMA_TOKEN_ATTR_UNUSED
        return not llama.llama_vocab_get_attr(self._s.vocab, token) & hidden

    def detokenize(self, ids: Sequence[int]) -> str:
        self._s.require_vocab()
        return self._s.detokenize([int(t) for t in ids if self._shown(int(t))])

    def text_tokens(self) -> list[bytes | None]:
        return self._s.text_pieces() if self._s.has_vocab else super().text_tokens()

    def token_bytes(self, token: int) -> bytes:
        return self._s.piece(token) if self._s.has_vocab else f"<{token}>".encode()

    def detokenizer(self) -> IncrementalDecoder | BytePieces:
        # A SentencePiece piece's text depends on its position (the first drops its space):
        # decode a window of recent ids, as the CTranslate2 backend does.
        if not self._s.has_vocab:
            return BytePieces(lambda token: b"")
        return IncrementalDecoder(_LlamaText(self))

    def is_end(self, token: int) -> bool:
        return token == self._eos

    def end_ids(self) -> list[int]:
        return [self._eos]

    # -- evaluation -----------------------------------------------------------------------
    # llama.cpp keeps the encoder output of the last `llama_encode` call only (tagged with its
    # sequence ids): sequences decoded together must be encoded together, in one call. So a
    # cohort starts when no sequence runs (`joins_running = False`), and its sources fit
    # one batch.
    joins_running = False

    @property
    def kv_cells(self) -> int:
        return self._s.kv_cells

    def reservation(self, seq: Decoding, max_new: int, sequences: int = 1) -> int:
        return sequences * min(max_new + 1, self.info.n_ctx)  # decoder tokens: the start token and the new ones

    @property
    def sequence_slots(self) -> int:
        return self._s.n_seq_max

    def _check_source(self, src: Sequence[int]) -> None:
        if len(src) > self._s.n_batch:
            raise RequestError(
                f"the source has {len(src)} tokens; the context holds {self._s.n_batch} (load with a larger n_ctx)"
            )

    def can_admit(self, reserve: int, seq: Decoding | None = None, slots: int = 1) -> bool:
        sources = self._cohort_sources + (len(seq.ids) if seq is not None else 0)
        fits = sources <= self._s.n_batch and sum(self.busy.values()) + reserve <= self.kv_cells
        return len(self.busy) + slots <= self._s.n_seq_max and (fits or not self.busy)

    def admit(self, seq: Decoding, reserve: int, followers: Sequence[Decoding] = ()) -> None:
        self._check_source(seq.ids)
        if not self.busy:  # a new cohort
            self._s.clear()
            self._cohort_sources = 0
        elif not self._unencoded:
            raise EngineError("llama.cpp's encoder-decoder graph only decodes sequences encoded together")
        free = (s for s in range(self._s.n_seq_max) if s not in self.busy)
        slot = next(free)
        self.busy[slot] = reserve
        self._unencoded.add(slot)
        self._cohort_sources += len(seq.ids)
        seq.slot, seq.position = slot, 0
        self._followers[slot] = []
        for follower in followers:  # encoded with the source's tokens tagged for it too
            follower.slot, follower.position = next(free), 0
            self.busy[follower.slot] = 0
            self._followers[slot].append(follower.slot)

    def fork(self, src: Decoding, dst: Decoding) -> None:
        self._s.share(src.slot, dst.slot, src.position)
        dst.position = src.position

    def evaluate(self, work: list[tuple[Decoding, list[int], bool | str]]) -> list[np.ndarray | None]:
        fresh = [(seq, tokens) for seq, tokens, _ in work if seq.slot in self._unencoded]
        if fresh:
            if len(fresh) != len(self._unencoded):
                raise EngineError("the sources of sequences decoded together must be encoded in one call")
            sources = [((seq.slot, *self._followers.get(seq.slot, ())), tokens, 0, False) for seq, tokens in fresh]
            self._s.evaluate(sources, encode=True)
            self._unencoded.clear()
        entries = []
        for seq, tokens, want in work:
            decoder = [self.start_token] if any(seq is f for f, _ in fresh) else tokens
            if seq.position + len(decoder) > self.info.n_ctx:
                raise RequestError(
                    f"{seq.position + len(decoder)} decoder tokens exceed the context of {self.info.n_ctx}"
                )
            entries.append((seq.slot, decoder, seq.position, want))
        out = [self._scaled(rows) for rows in self._s.evaluate(entries)]
        for (seq, _, _), (_, decoder, _, _) in zip(work, entries):
            seq.position += len(decoder)
        return out

    def _scaled(self, logits: np.ndarray | None) -> np.ndarray | None:
        if logits is None or self.output_scale == 1.0:
            return logits
        return logits * np.float32(self.output_scale)

    def release(self, seq: Decoding) -> None:
        if self.busy.pop(seq.slot, None) is not None:
            self._unencoded.discard(seq.slot)
            self._followers.pop(seq.slot, None)
            self._s.clear(0, seq.slot)
            super().release(seq)

    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """Each source's mean encoder output (after the encoder's final norm, transformers'
        T5EncoderModel last_hidden_state), from an embedding context of its own
        (llama_common.EmbeddingContext): the encoder output running sequences attend to stays."""
        return self._s.embed(inputs, self.lock)

    def logits(self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None = None) -> np.ndarray:
        """float32 [len(decoder_input_ids), vocab]: next-token logits at each decoder position.

        `decoder_input_ids` starts with the decoder start token (default: just that token)."""
        src, dec = self.decoder_ids(input_ids, decoder_input_ids)
        self._check_source(src)
        if len(dec) > self.info.n_ctx:
            raise RequestError(f"{len(dec)} decoder tokens exceed the context of {self.info.n_ctx}")
        with self.lock:
            self.wait_idle()  # encoding replaces the encoder output running sequences attend to
            self._s.clear()
            self._s.evaluate([(0, src, 0, False)], encode=True)
            try:
                return self._scaled(self._s.evaluate([(0, dec, 0, "all")])[0])
            finally:
                self._s.clear()
