"""One loaded llama.cpp model and context, through llama-cpp-python's C API.

Both GGUF backends (causal and encoder-decoder) own one `LlamaSession`: it checks the file's
metadata against its tensors (convert/core/checks.py: llama.cpp trusts them, and aborts or
allocates without bound on hostile values), decides the context and the KV cache's memory
(`plan_context`, also what `pocketlm info` shows), loads the file, creates the context (an
f32 model gets an f32 KV cache and no flash attention: it is asked for exactness), and runs
token batches asking for exactly the logits rows needed.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pocketlm.converters.core import engine
from pocketlm.converters.core.checks import INT32_MAX, GGUFDims, check_gguf, kv_cell_bytes
from pocketlm.converters.core.engine import extra_buffer_types
from pocketlm.converters.core.errors import EngineError, ModelLoadError, RequestError
from pocketlm.converters.core.formats import gguf_quant_name
from pocketlm.converters.core.gguf_file import GGUFHeader
from pocketlm.converters.core.gguf_split import model_files, read_model_header
from pocketlm.core.engine import ModelInfo
from pocketlm.core.generation import MAX_SEQUENCES
from pocketlm.loading.machine import available_ram_bytes, ram_bytes

log = logging.getLogger(__name__)

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
CTX_STEP = 256  # llama.cpp rounds n_ctx up to a multiple of this
KV_CELLS_CAP = 16384  # default KV cache of several sequences: n_seq x n_ctx tokens, at most this
KV_RAM_SHARE = 1 / 8  # ... and at most this share of the machine's RAM
KV_AVAILABLE_SHARE = 1 / 2  # any KV cache: at most this share of the RAM available beside the weights
MIB = 2**20
EMBED_SEQUENCES = 16  # inputs evaluated together in one embedding batch
EMBED_OUTPUT_BYTES = 128 * MIB  # what llama.cpp's output buffer may take in an embedding call
# what it may take for the logits of every token of a prompt (a score, an echo): such a prompt is
# evaluated in batches of at most this many bytes of rows (llama.cpp keeps its buffer at the largest)
ALL_LOGITS_BYTES = 128 * MIB


def context_size(trained: int, max_ctx: int, requested: int | None = None) -> int:
    """One sequence's context: as requested (rounded up as llama.cpp does), else the trained
    length capped at `max_ctx` (never more than the model was trained for)."""
    return -(-requested // CTX_STEP) * CTX_STEP if requested else min(trained, max_ctx)


def default_kv_cells(n_ctx: int, n_seq: int, cell_bytes: int) -> int:
    """The KV cache several sequences share by default: n_seq x n_ctx tokens, at most
    KV_CELLS_CAP and KV_RAM_SHARE of the RAM, at least one sequence's context."""
    if n_seq == 1:
        return n_ctx
    cells = min(n_seq * n_ctx, max(n_ctx, KV_CELLS_CAP))
    ram = ram_bytes()
    if ram:
        cells = min(cells, int(ram * KV_RAM_SHARE) // max(1, cell_bytes))
    return max(n_ctx, cells)


def kv_ram_budget(model_bytes: int) -> int | None:
    """Bytes a KV cache may take here: KV_AVAILABLE_SHARE of the RAM available once the
    weights (`model_bytes`) are in memory; None when the machine does not say."""
    available = available_ram_bytes()
    return None if available is None else int(max(0, available - model_bytes) * KV_AVAILABLE_SHARE)


@dataclass(frozen=True)
class ContextPlan:
    """The context asked of llama.cpp, decided before it allocates anything."""

    n_ctx: int  # one sequence's context
    kv_cells: int  # tokens the KV cache holds, all sequences together (llama_context_params.n_ctx)
    cell_bytes: int  # bytes of one token in the cache (pocketlm.converters.core.checks.kv_cell_bytes)
    warning: str | None = None  # why the default context was cut

    @property
    def kv_bytes(self) -> int:
        return self.kv_cells * self.cell_bytes


def plan_context(
    path: Any,
    dims: GGUFDims,
    max_ctx: int,
    n_ctx: int | None = None,
    n_seq: int = 1,
    kv_cells: int | None = None,
    exact: bool = False,
    model_bytes: int = 0,
) -> ContextPlan:
    """One sequence's context and the KV cache of `n_seq` sequences: as asked (`n_ctx`,
    `kv_cells`), else the trained context capped at `max_ctx` and `default_kv_cells`; in
    int32, and within `kv_ram_budget`: a default cache larger than that is cut to fit (with
    a warning), one asked for is refused. `exact` caches in f32 (else f16)."""
    for name, value in (("n_ctx", n_ctx), ("kv_cells", kv_cells)):
        if value is not None and not 1 <= value <= INT32_MAX:
            raise ModelLoadError(f"{name}={value}: a context holds 1 to {INT32_MAX} tokens")
    seq_ctx = context_size(dims.n_ctx_train, max_ctx, n_ctx)
    cell_bytes = kv_cell_bytes(dims, 4 if exact else 2)
    cells = kv_cells if kv_cells is not None else default_kv_cells(seq_ctx, n_seq, cell_bytes)
    total = -(-max(cells, seq_ctx) // CTX_STEP) * CTX_STEP
    budget = kv_ram_budget(model_bytes)
    fits = min(INT32_MAX, INT32_MAX if budget is None else budget // cell_bytes) // CTX_STEP * CTX_STEP
    if total <= fits:
        return ContextPlan(seq_ctx, total, cell_bytes)
    need = f"a KV cache of {total} tokens ({total * cell_bytes / MIB:.1f} MiB)"
    spare = f"this machine can spare {budget / MIB:.1f} MiB" if budget is not None else "llama.cpp counts in int32"
    if fits == 0:
        raise ModelLoadError(f"{path}: {need} does not fit: {spare}, not even {CTX_STEP} tokens")
    if n_ctx is not None or kv_cells is not None:
        raise ModelLoadError(f"{path}: {need} does not fit: {spare} (at most {fits} tokens: ask for fewer)")
    warning = f"{path}: {need} does not fit: {spare}; the KV cache holds {fits} tokens instead"
    return ContextPlan(min(seq_ctx, fits), fits, cell_bytes, warning)


class LlamaSession:
    def __init__(
        self,
        path: Path,
        n_gpu_layers: int,
        threads: int,
        n_ctx: int | None,
        max_ctx: int,
        n_batch: int | None = None,
        kv_type: str | None = None,
        n_seq: int = 1,
        kv_cells: int | None = None,
        header: GGUFHeader | None = None,
    ):
        """`n_ctx` is one sequence's context; `n_batch=None` makes the batch as large (an
        encoder needs the whole source in one batch). `n_seq` requests may be in the KV cache
        at once, sharing its `kv_cells` cells (default: n_seq x n_ctx, at most KV_CELLS_CAP);
        the cache has `n_seq_max` sequence ids, at least MAX_SEQUENCES, for the samples and
        beams of a request (ids cost nothing: the cells are one pool). `header` is the file's
        parsed header when the caller has it (else it is read here)."""
        self.path = path
        self.llama = llama = engine.llama_cpp()
        self.model = self.ctx = self.batch = None
        self._embedder: EmbeddingContext | None = None  # made on the first `embed`
        self._embedding = threading.Lock()  # one embedding call at a time uses it
        header = header if header is not None else read_model_header(path)  # any file of a split model
        files = model_files(header, path)
        self.path = path = files[0]  # llama.cpp opens a split model by its first file
        dims = check_gguf(header, path)  # before llama.cpp sees the file: it trusts these numbers
        self.quant = gguf_quant_name(header.metadata)
        exact = (kv_type or ("f32" if self.quant == "f32" else "f16")) == "f32"
        plan = plan_context(path, dims, max_ctx, n_ctx, n_seq, kv_cells, exact, sum(f.stat().st_size for f in files))
        if plan.warning:
            log.warning(plan.warning)
        mparams = llama.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_extra_bufts = extra_buffer_types()
        with engine.quiet_c_output():
            self.model = llama.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ModelLoadError(f"{path}: llama.cpp could not load this model: {engine.recent_log()}")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.architecture = self.meta("general.architecture") or "unknown"
        self.threads, self.exact = threads, exact
        self.n_seq_max = max(n_seq, MAX_SEQUENCES)
        try:
            self.ctx = self.new_context(plan.kv_cells, min(n_batch or plan.n_ctx, plan.kv_cells), self.n_seq_max)
        except ModelLoadError:
            self.close()
            raise
        self.kv_cells = llama.llama_n_ctx(self.ctx)
        self.n_ctx = min(plan.n_ctx, self.kv_cells)
        self.kv_bytes = self.kv_cells * plan.cell_bytes
        self.cell_bytes = plan.cell_bytes
        self.n_batch = llama.llama_n_ubatch(self.ctx)
        self.n_seq = n_seq
        self.batch = llama.llama_batch_init(self.n_batch, 0, self.n_seq_max)
        self.memory = llama.llama_get_memory(self.ctx)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.has_vocab = llama.llama_vocab_type(self.vocab) != llama.LLAMA_VOCAB_TYPE_NONE
        self._piece_buf = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}  # token -> piece, filled as tokens are met

    def new_context(self, cells: int, n_batch: int, n_seq_max: int, embeddings: bool = False) -> Any:
        """A llama.cpp context on the loaded model: a KV cache of `cells` tokens shared by
        `n_seq_max` sequence ids, batches of `n_batch` tokens, with this session's threads and
        cache type (an f32 model gets an f32 cache and no flash attention, which rounds through
        f16 on CPU). `embeddings`: each token's final hidden state is returned, not pooled.
        The weights are the model's, loaded once: its llama.cpp buffer types (see
        extra_buffer_types) hold for every context."""
        llama = self.llama
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = cells
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.type_k = cparams.type_v = GGML_TYPE_F32 if self.exact else GGML_TYPE_F16
        cparams.no_perf = True
        cparams.n_seq_max, cparams.kv_unified = n_seq_max, True
        if self.exact:
            cparams.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if embeddings:
            cparams.embeddings, cparams.pooling_type = True, llama.LLAMA_POOLING_TYPE_NONE
        with engine.quiet_c_output():
            ctx = llama.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise ModelLoadError(f"{self.path}: llama.cpp could not create a context: {engine.recent_log()}")
        return ctx

    @property
    def has_encoder(self) -> bool:
        return bool(self.llama.llama_model_has_encoder(self.model))

    def model_info(self, device: str, threads: int, reasons: Sequence[str]) -> ModelInfo:
        """The `info` of a model running on this session."""
        return ModelInfo(
            path=str(self.path),
            format="gguf",
            backend="llama.cpp",
            device=device,
            architecture=self.architecture,
            quant=self.quant,
            n_ctx=self.n_ctx,
            vocab_size=self.n_vocab,
            threads=threads,
            has_tokenizer=self.has_vocab,
            reasons=list(reasons),
            parallel=self.n_seq,
            kv_cells=self.kv_cells,
            kv_bytes=self.kv_bytes,
        )

    # -- metadata and vocabulary ---------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = self.llama.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def special(self, name: str, from_vocab: Any, default: int | None) -> int | None:
        """A special id: llama.cpp's when it has a tokenizer, else the one the converter recorded."""
        if self.has_vocab:
            value = from_vocab(self.vocab)
            if value >= 0:
                return int(value)
        meta = self.meta(f"tokenizer.ggml.{name}_token_id")
        return int(meta) if meta is not None else default

    def require_vocab(self) -> None:
        if not self.has_vocab:
            raise RequestError(
                f"{self.path} has no tokenizer (converted without tokenizer files); pass token ids instead of text"
            )

    def tokenize(self, text: str) -> list[int]:
        """add_special: only what the GGUF asks for (BLOOM nothing, T5 </s>); parse_special:
        text such as "</s>" becomes its special id, as the Hugging Face tokenizer does."""
        self.require_vocab()
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):  # a too-small buffer returns the needed size, negated
            buf = (self.llama.llama_token * cap)()
            n = self.llama.llama_tokenize(self.vocab, data, len(data), buf, cap, True, True)
            if n >= 0:
                return list(buf[:n])
            cap = -n
        raise EngineError("llama.cpp could not tokenize the text")

    def piece(self, token: int) -> bytes:
        """The bytes of one token as it appears inside a text."""
        piece = self._pieces.get(token)
        if piece is not None:
            return piece
        if not self.has_vocab:
            return b""
        n = self.llama.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self.llama.llama_token_to_piece(self.vocab, token, self._piece_buf, -n, 0, False)
        piece = self._pieces[token] = self._piece_buf.raw[:n]
        return piece

    def text_pieces(self) -> list[bytes | None]:
        """Every token's piece; None for control, unknown and unused tokens (not text)."""
        llama = self.llama
        hidden = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_UNKNOWN | llama.LLAMA_TOKEN_ATTR_UNUSED
        return [
            None if llama.llama_vocab_get_attr(self.vocab, i) & hidden else self.piece(i) for i in range(self.n_vocab)
        ]

    def detokenize(self, ids: Sequence[int]) -> str:
        """llama.cpp's own detokenizer (which drops a SentencePiece text's first space, as HF does)."""
        self.require_vocab()
        if not ids:
            return ""
        tokens = (self.llama.llama_token * len(ids))(*ids)
        cap = 16 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = self.llama.llama_detokenize(self.vocab, tokens, len(ids), buf, cap, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n
        raise EngineError("llama.cpp could not detokenize the ids")

    # -- evaluation ------------------------------------------------------------------------
    def clear(self, keep: int = 0, seq: int | None = None) -> None:
        """Forget the KV cache of sequence `seq` (default: of every sequence) from position
        `keep` on (default: all of it)."""
        if keep == 0 and seq is None:
            self.llama.llama_memory_clear(self.memory, True)
        else:
            self.llama.llama_memory_seq_rm(self.memory, -1 if seq is None else seq, keep, -1)

    def evaluate(
        self,
        entries: Sequence[tuple[int | tuple[int, ...], Sequence[int], int, bool | str]],
        encode: bool = False,
        sink: Callable[[int, int, np.ndarray], None] | None = None,
    ) -> list[np.ndarray | None]:
        """Tokens of several sequences in as few batches as fit. Each entry is (sequence id, or
        ids of sequences the tokens belong to at once, tokens, position of the first, which
        logits to return: True for those after the last token (float32 [vocab]), "all" for
        those after each ([n, vocab]), False for none). With `sink`, the rows are not kept:
        `sink(entry, index of the row in the entry's, row)` as each batch returns them (the row
        is llama.cpp's buffer, valid during the call)."""
        flat = [
            (tok, start + i, seq, want == "all" or (want is True and i == len(tokens) - 1), k)
            for k, (seq, tokens, start, want) in enumerate(entries)
            for i, tok in enumerate(tokens)
        ]
        rows_of: list[list[np.ndarray]] = [[] for _ in entries]
        b = self.batch
        step = self.n_batch
        if any(want == "all" for *_, want in entries):
            step = max(1, min(step, ALL_LOGITS_BYTES // (4 * self.n_vocab)))
        for lo in range(0, len(flat), step):
            chunk = flat[lo : lo + step]
            for i, (tok, pos, seq, want, _) in enumerate(chunk):
                ids = seq if isinstance(seq, tuple) else (seq,)
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(ids), want or encode
                for j, sid in enumerate(ids):
                    b.seq_id[i][j] = sid
            b.n_tokens = len(chunk)
            rc = (self.llama.llama_encode if encode else self.llama.llama_decode)(self.ctx, b)
            if rc != 0:
                self.clear()
                what = "encode" if encode else "decode"
                raise EngineError(f"llama.cpp {what} failed (code {rc}): {engine.recent_log()}")
            asked = [k for *_, want, k in chunk if want]
            if asked and not encode:
                ptr = self.llama.llama_get_logits(self.ctx)
                rows = np.ctypeslib.as_array(ptr, shape=(len(asked), self.n_vocab))
                if sink is not None:
                    for row, k in zip(rows, asked):
                        sink(k, len(rows_of[k]), row)
                        rows_of[k].append(None)  # counted, not kept
                    continue
                for row, k in zip(rows.copy(), asked):
                    rows_of[k].append(row)
        if sink is not None:
            return [None] * len(entries)
        return [
            (np.stack(rows) if want == "all" else rows[-1]) if rows else None
            for rows, (_, _, _, want) in zip(rows_of, entries)
        ]

    def share(self, src: int, dst: int, n: int) -> None:
        """Sequence `dst` starts with the first `n` cached tokens of `src` (shared cells)."""
        self.llama.llama_memory_seq_rm(self.memory, dst, 0, -1)
        self.llama.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def embed(self, inputs: list[list[int]], lock: Any) -> np.ndarray:
        """float64 [n, dim]: each input's mean final hidden state (EmbeddingContext), every
        llama.cpp call made holding `lock` (the engine's)."""
        with self._embedding:
            if self._embedder is None:
                with lock:
                    try:
                        self._embedder = EmbeddingContext(self)
                    except ModelLoadError as e:  # the model runs: this call failed, not the load
                        raise EngineError(f"no embedding context: {e}") from None
            return self._embedder.embed(inputs, lock)

    def close(self) -> None:
        llama = self.llama
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self.batch is not None:
            llama.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama.llama_model_free(self.model)
            self.model = None


class EmbeddingContext:
    """A second llama.cpp context on a session's model, with embeddings on: it gives each
    token's final hidden state (BLOOM: after `ln_f`, what transformers' BloomModel returns as
    last_hidden_state; T5: the encoder's output after its final norm, T5EncoderModel's), and
    `embed` averages them per input.

    Its own context, so the generation context's sequences, cache and encoder output are
    never touched; made on the first embedding call, it takes memory only then:
    - a KV cache of one sequence's context (`n_ctx` cells of the generation cache's type:
      `kv_bytes`, logged when made; a T5 context holds its decoder's cache, unused);
    - llama.cpp's output buffer, which keeps logits beside the hidden states: 4 x (vocab + dim)
      bytes per token of the largest call. Calls are cut to keep it near EMBED_OUTPUT_BYTES
      (`call_tokens`; bloomz-560m about 130 tokens); a T5 source longer than that is encoded
      alone, in one call (the encoder takes a whole source at once);
    - a compute buffer sized by llama.cpp for one call.
    The weights are the model's, loaded once: the session's buffer types (no AMX repacking on
    CPUs that fault on it, see extra_buffer_types) apply here too.

    Pooling is done here, not by llama.cpp: its mean pooling averages per micro-batch, and a
    causal input longer than one call spans several."""

    def __init__(self, session: LlamaSession):
        llama = self.llama = session.llama
        self.encoder = session.has_encoder
        self.dim = int(llama.llama_model_n_embd_out(session.model))
        cells = -(-session.n_ctx // CTX_STEP) * CTX_STEP
        self.call_tokens = max(1, min(session.n_ctx, EMBED_OUTPUT_BYTES // (4 * (session.n_vocab + self.dim))))
        # an encoder takes every source of a call in one micro-batch, the longest included
        n_batch = cells if self.encoder else self.call_tokens
        self.ctx = session.new_context(cells, n_batch, EMBED_SEQUENCES, embeddings=True)
        self.cells = llama.llama_n_ctx(self.ctx)
        self.memory = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(llama.llama_n_batch(self.ctx), 0, 1)
        self.kv_bytes = self.cells * session.cell_bytes
        log.info(
            "%s: embedding context made: KV cache of %d tokens (%.1f MiB), up to %d tokens per call",
            session.path,
            self.cells,
            self.kv_bytes / MIB,
            self.call_tokens,
        )

    def embed(self, inputs: list[list[int]], lock: Any) -> np.ndarray:
        """float64 [n, dim]: each input's mean final hidden state. Inputs go in groups of up to
        EMBED_SEQUENCES evaluated together (sequence ids 0..k-1 in one batch); each llama.cpp
        call holds `lock`, so generation steps run between calls."""
        sums = np.zeros((len(inputs), self.dim), np.float64)
        for group in self._groups(inputs):
            flat = [(tok, pos, seq, k) for seq, k in enumerate(group) for pos, tok in enumerate(inputs[k])]
            step = len(flat) if self.encoder else self.call_tokens
            for lo in range(0, len(flat), step):
                chunk = flat[lo : lo + step]
                with lock:
                    if lo == 0:
                        self.llama.llama_memory_clear(self.memory, True)
                    rows = self._run(chunk)
                np.add.at(sums, [k for *_, k in chunk], rows)
        return sums / np.array([len(ids) for ids in inputs], np.float64)[:, None]

    def _groups(self, inputs: list[list[int]]) -> list[list[int]]:
        """Indices of the inputs evaluated together: consecutive, at most EMBED_SEQUENCES, their
        tokens within one call (T5, unless a source alone is longer) or the KV cache (causal)."""
        room = self.call_tokens if self.encoder else self.cells
        groups: list[list[int]] = []
        used = 0
        for k, ids in enumerate(inputs):
            if groups and len(groups[-1]) < EMBED_SEQUENCES and used + len(ids) <= room:
                groups[-1].append(k)
                used += len(ids)
            else:
                groups.append([k])
                used = len(ids)
        return groups

    def _run(self, chunk: list[tuple[int, int, int, int]]) -> np.ndarray:
        llama, b = self.llama, self.batch
        for i, (tok, pos, seq, _) in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, True
            b.seq_id[i][0] = seq
        b.n_tokens = len(chunk)
        rc = (llama.llama_encode if self.encoder else llama.llama_decode)(self.ctx, b)
        if rc != 0:
            llama.llama_memory_clear(self.memory, True)
            what = "encode" if self.encoder else "decode"
            raise EngineError(f"llama.cpp {what} failed (code {rc}) computing embeddings: {engine.recent_log()}")
        ptr = llama.llama_get_embeddings(self.ctx)
        if not ptr:
            raise EngineError(f"llama.cpp returned no embeddings: {engine.recent_log()}")
        return np.ctypeslib.as_array(ptr, shape=(len(chunk), self.dim)).astype(np.float64)

    def close(self) -> None:
        if self.batch is not None:
            self.llama.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self.llama.llama_free(self.ctx)
            self.ctx = None


class OwnsSession:
    """close() and the finaliser of an engine that holds its LlamaSession in `_s`."""

    def close(self) -> None:
        session = getattr(self, "_s", None)
        if session is not None:
            session.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass
