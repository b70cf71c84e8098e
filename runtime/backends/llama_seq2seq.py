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

from convert.core.errors import GenerationError, ModelLoadError

from ..model import BytePieces, Decoding, Seq2Seq, StepModel
from ..tokenizer import IncrementalDecoder
from .llama_common import LlamaSession, OwnsSession

DEFAULT_MAX_CTX = 1024  # source tokens and decoder tokens; capped by the model's training length


class _LlamaText:
    """The model's tokenize/detokenize as a runtime.tokenizer Tokenizer (for IncrementalDecoder)."""

    def __init__(self, model: LlamaSeq2SeqModel):
        self.encode, self.decode = model.tokenize, model.detokenize


class LlamaSeq2SeqModel(OwnsSession, Seq2Seq, StepModel):
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
    ):
        super().__init__()
        # The encoder takes the whole source in one micro-batch: the batch is the context.
        self._s = s = LlamaSession(path, n_gpu_layers, threads, n_ctx, DEFAULT_MAX_CTX, n_batch=None)
        if not s.has_encoder:
            s.close()
            raise ModelLoadError(f"{path}: not an encoder-decoder model (load it with the causal llama.cpp backend)")
        self._eos = s.special("eos", s.llama.llama_vocab_eos, 1)
        start = s.llama.llama_model_decoder_start_token(s.model)
        self._start_token = start if start >= 0 else s.special("pad", s.llama.llama_vocab_pad, 0)
        self._n_decoded = 0  # decoder tokens in the KV cache
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

    def _detokenizer(self) -> IncrementalDecoder | BytePieces:
        # A SentencePiece piece's text depends on its position (the first drops its space):
        # decode a window of recent ids, as the CTranslate2 backend does.
        if not self._s.has_vocab:
            return BytePieces(lambda token: b"")
        return IncrementalDecoder(_LlamaText(self))

    def _is_end(self, token: int) -> bool:
        return token == self._eos

    def _end_ids(self) -> list[int]:
        return [self._eos]

    # -- evaluation -----------------------------------------------------------------------
    def _encode(self, src: Sequence[int]) -> None:
        """Run the encoder over the source and start an empty decoder sequence."""
        if len(src) > self._s.n_batch:
            raise GenerationError(
                f"the source has {len(src)} tokens; the context holds {self._s.n_batch} (load with a larger n_ctx)"
            )
        self._s.clear()
        self._n_decoded = 0
        self._s.run(src, 0, all_logits=False, encode=True)

    def _decode(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        """Append decoder tokens; logits of every one of them or of the last."""
        if self._n_decoded + len(ids) > self.info.n_ctx:
            raise GenerationError(
                f"{self._n_decoded + len(ids)} decoder tokens exceed the context of {self.info.n_ctx}"
            )
        try:
            return self._s.run(ids, self._n_decoded, all_logits)
        finally:
            self._n_decoded += len(ids)

    def _start(self, seq: Decoding) -> np.ndarray:
        # llama.cpp cross-attends to the last encoder output only: one sequence at a time.
        self._encode(seq.ids)
        seq.slot = 0
        return self._decode([self._start_token], all_logits=False)

    def _advance(self, seqs: list[Decoding], tokens: list[int]) -> list[np.ndarray]:
        if len(seqs) != 1:
            raise GenerationError("llama.cpp's encoder-decoder graph decodes one sequence at a time")
        return [self._decode(tokens, all_logits=False)]

    def logits(self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None = None) -> np.ndarray:
        """float32 [len(decoder_input_ids), vocab]: next-token logits at each decoder position.

        `decoder_input_ids` starts with the decoder start token (default: just that token)."""
        src, dec = self._decoder_ids(input_ids, decoder_input_ids)
        with self._lock:
            self._encode(src)
            return self._decode(dec, all_logits=True)
