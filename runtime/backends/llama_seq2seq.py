"""Encoder-decoder GGUF models (llama.cpp's `t5`: T5, Flan-T5, mT5/mT0, T0) on llama.cpp.

llama-cpp-python's high-level `Llama` class cannot run an encoder, so this backend uses the
C API: `llama_encode` runs the encoder over the source once (llama.cpp keeps its output for
cross-attention), then `llama_decode` extends the decoder one token at a time from the
decoder start token, with PocketLM's own sampler choosing each token.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from convert import engine
from convert.errors import GenerationError, ModelLoadError
from convert.gguf_target import FILE_TYPE_NAMES

from ..model import BytePieces, ModelInfo, StepModel
from ..sampling import Sampler, SamplingParams
from ..tokenizer import IncrementalDecoder

log = logging.getLogger(__name__)

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
DEFAULT_MAX_CTX = 1024  # source tokens and decoder tokens; capped by the model's training length
CTX_STEP = 256  # llama.cpp rounds n_ctx up to a multiple of this


class _LlamaText:
    """The model's tokenize/detokenize as a runtime.tokenizer Tokenizer (for IncrementalDecoder)."""

    def __init__(self, model: "LlamaSeq2SeqModel"):
        self.encode, self.decode = model.tokenize, model.detokenize


class LlamaSeq2SeqModel(StepModel):
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
        self._llama = llama = engine.llama_cpp()
        self._model = self._ctx = self._batch = None
        mparams = llama.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        with engine.quiet_c_output():
            self._model = llama.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ModelLoadError(f"{path}: llama.cpp could not load this model: {engine.recent_log()}")
        if not llama.llama_model_has_encoder(self._model):
            self.close()
            raise ModelLoadError(f"{path}: not an encoder-decoder model (load it with the causal llama.cpp backend)")
        self._vocab = llama.llama_model_get_vocab(self._model)

        arch = self._meta("general.architecture") or "unknown"
        file_type = self._meta("general.file_type")
        quant = self._meta("pocketlm.quant") or FILE_TYPE_NAMES.get(int(file_type or -1), "unknown")
        train_ctx = llama.llama_model_n_ctx_train(self._model)
        n_ctx = n_ctx or min(train_ctx, DEFAULT_MAX_CTX) or DEFAULT_MAX_CTX
        n_ctx = -(-n_ctx // CTX_STEP) * CTX_STEP  # llama.cpp rounds the context up; the batch must follow
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = n_ctx
        # The encoder takes the whole source in one micro-batch: the batch is the context.
        cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        if quant == "f32":  # an f32 model is asked for exactness: f32 KV cache, no flash attention
            cparams.type_k = cparams.type_v = GGML_TYPE_F32
            cparams.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        else:
            cparams.type_k = cparams.type_v = GGML_TYPE_F16
        with engine.quiet_c_output():
            self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ModelLoadError(f"{path}: llama.cpp could not create a context: {engine.recent_log()}")
        self._n_batch = llama.llama_n_ubatch(self._ctx)
        self._batch = llama.llama_batch_init(self._n_batch, 0, 1)
        self._memory = llama.llama_get_memory(self._ctx)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self._has_vocab = llama.llama_vocab_type(self._vocab) != llama.LLAMA_VOCAB_TYPE_NONE
        self._eos = self._special("eos", llama.llama_vocab_eos, 1)
        start = llama.llama_model_decoder_start_token(self._model)
        self._start = start if start >= 0 else self._special("pad", llama.llama_vocab_pad, 0)
        self._n_decoded = 0  # decoder tokens in the KV cache
        self.info = ModelInfo(
            path=str(path), format="gguf", backend="llama.cpp", device=device,
            architecture=arch, quant=quant, n_ctx=llama.llama_n_ctx(self._ctx),
            vocab_size=self._n_vocab, threads=threads, has_tokenizer=self._has_vocab,
            reasons=list(reasons),
        )

    # -- metadata -------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = self._llama.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _special(self, name: str, from_vocab: Any, default: int) -> int:
        """A special id: llama.cpp's when it has a tokenizer, else the one the converter recorded."""
        if self._has_vocab:
            value = from_vocab(self._vocab)
            if value >= 0:
                return int(value)
        meta = self._meta(f"tokenizer.ggml.{name}_token_id")
        return int(meta) if meta is not None else default

    # -- tokens ---------------------------------------------------------------------------
    def _require_vocab(self) -> None:
        if not self._has_vocab:
            raise GenerationError(
                f"{self.info.path} has no tokenizer (converted without tokenizer files); "
                "pass token ids instead of text"
            )

    def tokenize(self, text: str) -> list[int]:
        """Ids as Hugging Face's T5 tokenizer gives them, </s> appended (the GGUF's add_eos)."""
        self._require_vocab()
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):  # a too-small buffer returns the needed size, negated
            buf = (self._llama.llama_token * cap)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, cap, True, True)
            if n >= 0:
                return list(buf[:n])
            cap = -n
        raise GenerationError("llama.cpp could not tokenize the text")

    def _shown(self, token: int) -> bool:
        """Whether decoding keeps a token: special, unknown and padding ids are skipped, as
        Hugging Face's decode(skip_special_tokens=True) does."""
        if not 0 <= token < self._n_vocab:
            return False
        hidden = self._llama.LLAMA_TOKEN_ATTR_CONTROL | self._llama.LLAMA_TOKEN_ATTR_UNKNOWN | self._llama.LLAMA_TOKEN_ATTR_UNUSED
        return not self._llama.llama_vocab_get_attr(self._vocab, token) & hidden

    def detokenize(self, ids: Sequence[int]) -> str:
        self._require_vocab()
        shown = [int(t) for t in ids if self._shown(int(t))]
        if not shown:
            return ""
        tokens = (self._llama.llama_token * len(shown))(*shown)
        cap = 16 * len(shown) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            # llama.cpp drops the first piece's leading space (add_space_prefix), as HF does
            n = self._llama.llama_detokenize(self._vocab, tokens, len(shown), buf, cap, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n
        raise GenerationError("llama.cpp could not detokenize the ids")

    def _detokenizer(self) -> IncrementalDecoder | BytePieces:
        # A SentencePiece piece's text depends on its position (the first drops its space):
        # decode a window of recent ids, as the CTranslate2 backend does.
        if not self._has_vocab:
            return BytePieces(lambda token: b"")
        return IncrementalDecoder(_LlamaText(self))

    def _is_end(self, token: int) -> bool:
        return token == self._eos

    def _end_ids(self) -> list[int]:
        return [self._eos]

    def _budget(self, n_prompt: int, max_new_tokens: int) -> int:
        return min(max_new_tokens, self.info.n_ctx)  # the decoder's length does not depend on the input's

    # -- evaluation -----------------------------------------------------------------------
    def _fill(self, ids: Sequence[int], start: int, logits: bool) -> None:
        b = self._batch
        for i, tok in enumerate(ids):
            b.token[i] = tok
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = logits
        b.n_tokens = len(ids)

    def _encode(self, src: Sequence[int]) -> None:
        """Run the encoder over the source and start an empty decoder sequence."""
        if len(src) > self._n_batch:
            raise GenerationError(f"the source has {len(src)} tokens; the context holds {self._n_batch} (load with a larger n_ctx)")
        self._llama.llama_memory_clear(self._memory, True)
        self._n_decoded = 0
        self._fill(src, 0, True)
        rc = self._llama.llama_encode(self._ctx, self._batch)
        if rc != 0:
            raise GenerationError(f"llama.cpp encode failed (code {rc}): {engine.recent_log()}")

    def _decode(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        """Append decoder tokens; logits of every one of them or of the last."""
        if self._n_decoded + len(ids) > self.info.n_ctx:
            raise GenerationError(f"{self._n_decoded + len(ids)} decoder tokens exceed the context of {self.info.n_ctx}")
        out = []
        for lo in range(0, len(ids), self._n_batch):
            chunk = ids[lo : lo + self._n_batch]
            last_chunk = lo + self._n_batch >= len(ids)
            self._fill(chunk, self._n_decoded, all_logits)
            if not all_logits and last_chunk:
                self._batch.logits[len(chunk) - 1] = True
            rc = self._llama.llama_decode(self._ctx, self._batch)
            if rc != 0:
                self._llama.llama_memory_clear(self._memory, True)
                self._n_decoded = 0
                raise GenerationError(f"llama.cpp decode failed (code {rc}): {engine.recent_log()}")
            self._n_decoded += len(chunk)
            rows = len(chunk) if all_logits else int(last_chunk)
            if rows:
                ptr = self._llama.llama_get_logits(self._ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(rows, self._n_vocab)).copy())
        return np.concatenate(out) if all_logits else out[-1][0]

    def _generate_ids(self, ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        """StepModel's loop, except that repetition penalties see the decoder's tokens (start
        token and output) and not the source, as transformers does for encoder-decoders."""
        sampler = Sampler(params)
        seen = [self._start]
        logits = self._prefill(ids)
        ends = self._end_ids() if params.min_new_tokens else []
        for i in range(max_new):
            token = sampler(logits, seen, ends if i < params.min_new_tokens else ())
            yield token
            seen.append(token)
            if i + 1 < max_new and not self._is_end(token):
                logits = self._step(token)

    def _prefill(self, ids: list[int]) -> np.ndarray:
        self._encode(ids)
        return self._decode([self._start], all_logits=False)

    def _step(self, token: int) -> np.ndarray:
        return self._decode([token], all_logits=False)

    def logits(self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None = None) -> np.ndarray:
        """float32 [len(decoder_input_ids), vocab]: next-token logits at each decoder position.

        `decoder_input_ids` starts with the decoder start token (default: just that token)."""
        src = [int(t) for t in input_ids]
        dec = [self._start] if decoder_input_ids is None else [int(t) for t in decoder_input_ids]
        if not src or not dec or dec[0] != self._start:
            raise GenerationError(f"decoder_input_ids must start with the decoder start token {self._start}")
        with self._lock:
            self._encode(src)
            return self._decode(dec, all_logits=True)

    def _continuation_logits(self, context: list[int], continuation: list[int]) -> np.ndarray:
        return self.logits(context, [self._start, *continuation])[: len(continuation)]

    def close(self) -> None:
        llama = getattr(self, "_llama", None)
        if llama is None:
            return
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
