"""GGUF models on llama.cpp, through llama-cpp-python's C API.

The high-level `Llama` class either computes logits for every prompt token (slow: BLOOM's
output layer is half the model) or only the last; this backend asks for exactly the rows it
needs per call, samples with PocketLM's own sampler, and keeps the KV cache of the previous
call so a prompt that extends the last one only evaluates its new tokens.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convert import engine
from convert.gguf_target import FILE_TYPE_NAMES
from convert.errors import GenerationError, ModelLoadError

from ..model import BytePieces, ModelInfo, StepModel

log = logging.getLogger(__name__)

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
DEFAULT_MAX_CTX = 2048


class LlamaCppModel(StepModel):
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
        self._vocab = llama.llama_model_get_vocab(self._model)
        if llama.llama_model_has_encoder(self._model):
            raise ModelLoadError(f"{path}: encoder-decoder GGUF models are not supported yet")

        arch = self._meta("general.architecture") or "unknown"
        file_type = self._meta("general.file_type")
        quant = self._meta("pocketlm.quant") or FILE_TYPE_NAMES.get(int(file_type or -1), "unknown")
        train_ctx = llama.llama_model_n_ctx_train(self._model)
        n_ctx = n_ctx or min(train_ctx, DEFAULT_MAX_CTX) or DEFAULT_MAX_CTX
        # An f32 model is asked for exactness: f32 KV cache, no flash attention.
        kv = kv_type or ("f32" if quant == "f32" else "f16")
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = min(n_batch, n_ctx)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.type_k = cparams.type_v = GGML_TYPE_F32 if kv == "f32" else GGML_TYPE_F16
        cparams.no_perf = True
        if kv == "f32":  # flash attention rounds through f16 on CPU: not for an exact model
            cparams.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        with engine.quiet_c_output():
            self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ModelLoadError(f"{path}: llama.cpp could not create a context: {engine.recent_log()}")
        self._n_batch = cparams.n_batch
        self._batch = llama.llama_batch_init(self._n_batch, 0, 1)
        self._memory = llama.llama_get_memory(self._ctx)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self._has_vocab = llama.llama_vocab_type(self._vocab) != llama.LLAMA_VOCAB_TYPE_NONE
        self._eos = self._end_tokens()
        self._cached: list[int] = []  # tokens whose keys/values are in the KV cache
        self._piece_buf = ctypes.create_string_buffer(256)
        self.warn_unterminated_prompts = arch == "bloom"
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

    def _end_tokens(self) -> set[int]:
        """End-of-sequence ids for models without tokenizer tables (others ask llama.cpp)."""
        if self._has_vocab:
            return set()
        # llama.cpp knows no special ids without a vocab, but the converter recorded eos.
        eos = self._meta("tokenizer.ggml.eos_token_id")
        return {int(eos)} if eos is not None else set()

    # -- tokens ---------------------------------------------------------------------------
    def _require_vocab(self) -> None:
        if not self._has_vocab:
            raise GenerationError(
                f"{self.info.path} has no tokenizer (converted without tokenizer files); "
                "pass token ids instead of text"
            )

    def tokenize(self, text: str) -> list[int]:
        self._require_vocab()
        data = text.encode("utf-8")
        cap = len(data) + 8
        # add_special: only what the GGUF asks for (BLOOM: nothing); parse_special: text such
        # as "</s>" becomes its special id, as the Hugging Face tokenizer does.
        buf = (self._llama.llama_token * cap)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, cap, True, True)
        if n < 0:  # buffer too small: llama.cpp returns the needed size, negated
            cap = -n
            buf = (self._llama.llama_token * cap)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, cap, True, True)
        return list(buf[:n])

    def _token_bytes(self, token: int) -> bytes:
        if not self._has_vocab:
            return b""
        n = self._llama.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self._llama.llama_token_to_piece(self._vocab, token, self._piece_buf, -n, 0, False)
        return self._piece_buf.raw[:n]

    def _detokenizer(self) -> BytePieces:
        return BytePieces(self._token_bytes)  # TextStream reassembles split UTF-8

    def _continuation_logits(self, context: list[int], continuation: list[int]) -> np.ndarray:
        full = context + continuation
        if len(full) > self.info.n_ctx:
            raise GenerationError(f"prompt + candidate ({len(full)} tokens) exceed the context of {self.info.n_ctx}")
        return self.logits(full)[len(context) - 1 : -1]

    def detokenize(self, ids: Sequence[int]) -> str:
        self._require_vocab()
        return b"".join(self._token_bytes(int(t)) for t in ids).decode("utf-8", "replace")

    def _end_ids(self) -> list[int]:
        if not self._has_vocab:
            return sorted(self._eos)
        ids = {self._llama.llama_vocab_eos(self._vocab), self._llama.llama_vocab_eot(self._vocab)}
        return sorted(t for t in ids if t >= 0)

    def _is_end(self, token: int) -> bool:
        if self._has_vocab:
            return bool(self._llama.llama_vocab_is_eog(self._vocab, token))
        return token in self._eos

    # -- evaluation -----------------------------------------------------------------------
    def _eval(self, ids: Sequence[int], start: int, all_logits: bool) -> np.ndarray:
        """Evaluate `ids` at positions start.., return logits of every row or of the last."""
        out = []
        b = self._batch
        for lo in range(0, len(ids), self._n_batch):
            chunk = ids[lo : lo + self._n_batch]
            last_chunk = lo + self._n_batch >= len(ids)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = start + lo + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (last_chunk and i == len(chunk) - 1)
            b.n_tokens = len(chunk)
            rc = self._llama.llama_decode(self._ctx, b)
            if rc != 0:
                self._reset()
                raise GenerationError(f"llama.cpp decode failed (code {rc}): {engine.recent_log()}")
            rows = len(chunk) if all_logits else int(last_chunk)
            if rows:
                ptr = self._llama.llama_get_logits(self._ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(rows, self._n_vocab)).copy())
        return np.concatenate(out) if all_logits else out[-1][0]

    def _reset(self, keep: int = 0) -> None:
        if keep == 0:
            self._llama.llama_memory_clear(self._memory, True)
        else:
            self._llama.llama_memory_seq_rm(self._memory, 0, keep, -1)
        self._cached = self._cached[:keep]

    def _prefill(self, ids: list[int]) -> np.ndarray:
        # Reuse the cached prefix; always re-evaluate at least the last token for its logits.
        keep = 0
        for a, b in zip(self._cached, ids[:-1]):
            if a != b:
                break
            keep += 1
        self._reset(keep)
        logits = self._eval(ids[keep:], keep, all_logits=False)
        self._cached = list(ids)
        return logits

    def _step(self, token: int) -> np.ndarray:
        logits = self._eval([token], len(self._cached), all_logits=False)
        self._cached.append(token)
        return logits

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in input_ids]
        if not ids:
            return np.zeros((0, self._n_vocab), dtype=np.float32)
        if len(ids) > self.info.n_ctx:
            raise GenerationError(f"{len(ids)} tokens exceed the context of {self.info.n_ctx}")
        with self._lock:
            self._reset()
            out = self._eval(ids, 0, all_logits=True)
            self._cached = list(ids)
            return out

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


def open_gguf(path: Path, **kwargs: Any) -> LlamaCppModel:
    return LlamaCppModel(path, **kwargs)
