"""Importance matrices: which input columns of each weight matrix matter, measured on a
calibration text with llama.cpp itself (no torch), for llama.cpp's low-bit quantizer.

For every weight W of a transformer block the matrix holds, per input column j, the sum over
the calibration tokens of x_j**2, where x is W's input: the quantizer then weighs each
column's rounding error by its mean activation power instead of treating columns alike, which
is what makes q2_k..q4_k usable. The statistics come from llama.cpp's `cb_eval` callback,
which sees every node of the graph as it is computed (as llama.cpp's `llama-imatrix` does).

Files use llama.cpp's imatrix GGUF layout (`<weight>.in_sum2`, `<weight>.counts`, the
`imatrix.*` keys), so a file from `llama-imatrix` works here and ours with `llama-quantize`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from .core import engine
from .core.errors import ModelLoadError, PocketLMError
from .core.formats import QuantType
from .core.gguf_file import IMATRIX_SUFFIX, IMATRIX_TYPE, MAGIC
from .ggml_quant import library
from .output import atomic_output

CHUNK_TOKENS = 512  # tokens per evaluation, as llama-imatrix's default context
MIN_ROWS = 16  # llama-imatrix ignores matrix products over fewer tokens
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
_GGML_F32 = 0
_MAX_DIMS, _MAX_SRC, _MAX_NAME, _MAX_OP_PARAMS = 4, 10, 64, 64


class _Tensor(ctypes.Structure):
    """`struct ggml_tensor` of the ggml that llama-cpp-python 0.3.36 bundles (ggml.h);
    `_ggml_tensors()` checks its size against the library before anything reads through it."""


_Tensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * _MAX_DIMS),
    ("nb", ctypes.c_size_t * _MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_Tensor) * _MAX_SRC),
    ("view_src", ctypes.POINTER(_Tensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * _MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def _ggml_tensors() -> tuple[Any, int]:
    """(libggml-base with the few functions used here, the value of GGML_OP_MUL_MAT)."""
    if "ggml" in _STATE:
        return _STATE["ggml"]
    lib = library()
    lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_tensor_overhead.restype, lib.ggml_tensor_overhead.argtypes = ctypes.c_size_t, []
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    object_size = 32  # struct ggml_object precedes each tensor in ggml_tensor_overhead()
    if lib.ggml_tensor_overhead() - object_size != ctypes.sizeof(_Tensor):
        raise PocketLMError(
            "this llama.cpp build's ggml_tensor differs from the one PocketLM reads; "
            "importance matrices need llama-cpp-python==0.3.36"
        )
    mul_mat = next((op for op in range(256) if lib.ggml_op_name(op) == b"MUL_MAT"), None)
    if mul_mat is None:
        raise PocketLMError("this llama.cpp build has no MUL_MAT operation")
    _STATE["ggml"] = (lib, mul_mat)
    return lib, mul_mat


_STATE: dict[str, Any] = {}


def weight_name(node_name: bytes) -> str:
    """`blk.0.attn_q.weight` from a graph node's source name (backends may wrap it as
    `CUDA0#blk.0.attn_q.weight#0`)."""
    name = node_name.decode("utf-8", "replace")
    parts = name.split("#")
    return parts[1] if len(parts) > 1 else name


def is_block_weight(name: str) -> bool:
    """The matrices llama-imatrix collects: those of the blocks (encoder and decoder ones
    too), not the output head, whose input llama.cpp sees only for the logits asked for."""
    return name.startswith(("blk.", "enc.blk.", "dec.blk.")) and name.endswith(".weight")


@dataclass
class ImportanceMatrix:
    """Per weight: the sum over tokens of each input column's square, and the token count."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    chunk_size: int = CHUNK_TOKENS
    chunks: int = 0
    datasets: list[str] = field(default_factory=list)

    def add(self, name: str, rows: np.ndarray) -> None:
        """Accumulate one matrix product's input rows ([tokens, columns])."""
        squares = np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
        if name in self.sums:
            if self.sums[name].shape != squares.shape:
                raise PocketLMError(f"importance matrix: {name} has {rows.shape[1]} columns, earlier {len(squares)}")
            self.sums[name] += squares
            self.counts[name] += len(rows)
        else:
            self.sums[name], self.counts[name] = squares, len(rows)

    def means(self) -> dict[str, np.ndarray]:
        """What the quantizer weighs columns by: the mean square per column, in float32 from
        the float32 sums as llama-quantize reads a file (so a kept file quantizes the same)."""
        return {k: v.astype(np.float32) / np.float32(max(1, self.counts[k])) for k, v in self.sums.items()}

    def save(self, path: Path) -> Path:
        """Write llama.cpp's imatrix GGUF atomically (replacing an older one)."""
        writer = gguf.GGUFWriter(path=None, arch=IMATRIX_TYPE)
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # an imatrix has none
        writer.add_type(IMATRIX_TYPE)
        writer.add_array(KEY_DATASETS, self.datasets or ["unknown"])
        writer.add_uint32(KEY_CHUNK_COUNT, self.chunks)
        writer.add_uint32(KEY_CHUNK_SIZE, self.chunk_size)
        for name in sorted(self.sums):
            writer.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32)[None, :])
            writer.add_tensor(f"{name}.counts", np.array([[self.counts[name]]], dtype=np.float32))
        with atomic_output(path, True) as tmp:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return path

    @classmethod
    def load(cls, path: Path) -> ImportanceMatrix:
        """Read an imatrix GGUF (ours or llama-imatrix's); one clear error otherwise."""
        try:
            reader = gguf.GGUFReader(path)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: not an importance matrix file ({e})") from None
        fields = {f.name: f for f in reader.fields.values()}

        def value(key: str) -> Any:
            return fields[key].contents() if key in fields else None

        if value(gguf.Keys.General.TYPE) != IMATRIX_TYPE and KEY_CHUNK_SIZE not in fields:
            raise ModelLoadError(f"{path}: a GGUF file, but not an importance matrix (general.type is not imatrix)")
        out = cls(
            chunk_size=int(value(KEY_CHUNK_SIZE) or 0),
            chunks=int(value(KEY_CHUNK_COUNT) or 0),
            datasets=list(value(KEY_DATASETS) or []),
        )
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
        for key, data in tensors.items():
            if not key.endswith(".in_sum2"):
                continue
            name = key.removesuffix(".in_sum2")
            counts = tensors.get(f"{name}.counts")
            if counts is None or counts.size != 1:
                raise ModelLoadError(f"{path}: {name} has no single count (expert matrices are not supported)")
            out.sums[name], out.counts[name] = data.reshape(-1).astype(np.float64), int(round(float(counts.item())))
        if not out.sums:
            raise ModelLoadError(f"{path}: an importance matrix file with no entries")
        return out

    def quantize_data(self) -> tuple[Any, list[Any]]:
        """llama_model_quantize_params.imatrix: a {name, data, size} array ending in a null
        entry, and the buffers it points into (keep them alive while quantizing)."""
        llama = engine.llama_cpp()
        means = self.means()
        array = (llama.llama_model_imatrix_data * (len(means) + 1))()
        keep: list[Any] = [array]
        for i, (name, values) in enumerate(sorted(means.items())):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            cname = ctypes.c_char_p(name.encode())
            keep += [buf, cname]
            array[i].name = cname.value
            array[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            array[i].size = buf.size
        return array, keep


def check_applies(quant: QuantType) -> None:
    """Only ggml's low-bit quantizers read an importance matrix: f32, f16, bf16 and q8_0
    (the types `QuantType.direct` names) round each value alone."""
    if quant.direct is not None:
        raise PocketLMError(
            f"--imatrix guides the low-bit quantizers (q2_k ... q6_k, q4_0 ... q5_1); {quant.name} does not use it"
        )


def is_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file: `--imatrix` reads one as a matrix, anything else as text."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                return False
    except OSError:
        return False
    return True


class _Collector:
    """The `cb_eval` callback: asks for every block matrix product over >= MIN_ROWS tokens
    of f32 activations, then adds its input rows to the matrix."""

    def __init__(self, matrix: ImportanceMatrix):
        self.matrix = matrix
        self.lib, self.mul_mat = _ggml_tensors()
        self.error: BaseException | None = None
        self.callback = engine.llama_cpp().ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, node: int, ask: bool, _user: Any) -> bool:
        try:
            t = _Tensor.from_address(node)
            if t.op != self.mul_mat or not t.src[0] or not t.src[1]:
                return not ask  # not asked for; a computed node we did not ask for continues
            w, x = t.src[0].contents, t.src[1].contents
            name = weight_name(w.name)
            if ask:
                return x.type == _GGML_F32 and x.ne[1] >= MIN_ROWS and is_block_weight(name)
            self.matrix.add(name, self._rows(t.src[1]))
            return True
        except BaseException as e:  # an exception cannot cross into C: stop the graph, re-raise after
            self.error = e
            return False

    def _rows(self, ptr: Any) -> np.ndarray:
        """A node's f32 activations as [rows, columns], copied out of its backend buffer."""
        x = ptr.contents
        nbytes = self.lib.ggml_nbytes(ctypes.addressof(x))
        raw = np.empty(nbytes, dtype=np.uint8)
        self.lib.ggml_backend_tensor_get(ctypes.addressof(x), raw.ctypes.data, 0, nbytes)
        ne, nb = list(x.ne), list(x.nb)
        if nb[0] != 4:
            raise PocketLMError("importance matrix: a matrix product's input is not contiguous in its rows")
        view = np.lib.stride_tricks.as_strided(
            raw.view(np.float32), shape=tuple(reversed(ne)), strides=tuple(reversed(nb))
        )
        return np.ascontiguousarray(view).reshape(-1, ne[0])


def compute(
    model_path: Path,
    text: str | Sequence[int],
    dataset: str = "calibration text",
    chunk_tokens: int = CHUNK_TOKENS,
    max_chunks: int | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> ImportanceMatrix:
    """The importance matrix of an f32/f16/bf16 GGUF model over `text` (or token ids), in
    chunks of `chunk_tokens` evaluated from an empty cache (a decoder-only model reads each
    chunk; an encoder-decoder encodes its first half and decodes the second, teacher-forced)."""
    llama = engine.llama_cpp()
    mparams = llama.llama_model_default_params()
    mparams.n_gpu_layers = 0  # activations are read on the host; this is a one-off job
    mparams.use_extra_bufts = engine.extra_buffer_types()
    with engine.quiet_c_output():
        model = llama.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise ModelLoadError(f"{model_path}: llama.cpp could not load this model: {engine.recent_log()}")
    ctx = batch = None
    try:
        vocab = llama.llama_model_get_vocab(model)
        if isinstance(text, str) and llama.llama_vocab_type(vocab) == llama.LLAMA_VOCAB_TYPE_NONE:
            raise ModelLoadError(f"{model_path}: has no tokenizer, so it cannot read a calibration text")
        encoder = bool(llama.llama_model_has_encoder(model))
        chunks, size = _chunks(llama, model, text, chunk_tokens, encoder, max_chunks, dataset)
        matrix = ImportanceMatrix(chunk_size=size, datasets=[dataset])
        collector = _Collector(matrix)
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = max(256, -(-(chunk_tokens + 2) // 256) * 256)
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads or 1
        cparams.no_perf = True
        cparams.cb_eval = collector.callback
        cparams.cb_eval_user_data = None
        with engine.quiet_c_output():
            ctx = llama.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelLoadError(f"{model_path}: llama.cpp could not create a context: {engine.recent_log()}")
        batch = llama.llama_batch_init(cparams.n_batch, 0, 1)
        memory = llama.llama_get_memory(ctx)
        start = llama.llama_model_decoder_start_token(model)
        if encoder and start < 0:  # T5 starts decoding from its pad token
            start = _special(llama, model, "padding", llama.llama_vocab_pad(vocab))
        for source, target in tqdm(chunks, desc="importance matrix", unit="chunk", disable=not progress, leave=False):
            llama.llama_memory_clear(memory, True)
            if encoder:
                _fill(batch, source)
                _run(llama.llama_encode, ctx, batch, collector, model_path)
                _fill(batch, [start] + target[:-1])
            else:
                _fill(batch, source)
            _run(llama.llama_decode, ctx, batch, collector, model_path)
            matrix.chunks += 1
        if not matrix.sums:
            raise PocketLMError(f"{model_path}: no block matrix product was seen (is this a transformer GGUF?)")
        return matrix
    finally:
        if batch is not None:
            llama.llama_batch_free(batch)
        if ctx:
            llama.llama_free(ctx)
        llama.llama_model_free(model)


def _chunks(
    llama: Any, model: Any, text: str | Sequence[int], size: int, encoder: bool, max_chunks: int | None, dataset: str
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(tokens read, tokens decoded) per chunk, and the chunk size: a decoder-only model
    reads `size` tokens (with its BOS if it uses one); an encoder-decoder encodes half a chunk
    plus EOS and decodes the other half. A text shorter than one chunk is one chunk."""
    vocab = llama.llama_model_get_vocab(model)
    if isinstance(text, str):
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama.llama_token * cap)()
        ids = list(buf[: max(0, llama.llama_tokenize(vocab, data, len(data), buf, cap, False, False))])
    else:
        ids = [int(t) for t in text]
    if len(ids) < 2 * MIN_ROWS:
        raise PocketLMError(f"{dataset}: calibration text too short ({len(ids)} tokens; need at least {2 * MIN_ROWS})")
    size = min(size, len(ids))
    pieces = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)][: max_chunks or None]
    if encoder:
        eos = _special(llama, model, "eos", llama.llama_vocab_eos(vocab))
        return [(p[: size // 2] + [eos], p[size // 2 :]) for p in pieces], size
    bos = [llama.llama_vocab_bos(vocab)] if llama.llama_vocab_get_add_bos(vocab) else []
    return [((bos + p)[:size], []) for p in pieces], size


def _special(llama: Any, model: Any, name: str, from_vocab: int) -> int:
    """A special id from the vocabulary, else from the converter's metadata (a GGUF written
    without tokenizer files has no vocabulary)."""
    if from_vocab >= 0:
        return from_vocab
    buf = ctypes.create_string_buffer(32)
    if llama.llama_model_meta_val_str(model, f"tokenizer.ggml.{name}_token_id".encode(), buf, len(buf)) < 0:
        raise PocketLMError(f"the model names no {name} token")
    return int(buf.value)


def _fill(batch: Any, tokens: Sequence[int]) -> None:
    """Every token asks for logits: llama.cpp drops the rows nobody reads before the last
    block's matrices, which would then go unmeasured."""
    batch.n_tokens = len(tokens)
    for i, tok in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = True


def _run(fn: Any, ctx: Any, batch: Any, collector: _Collector, path: Path) -> None:
    with engine.quiet_c_output():
        rc = fn(ctx, batch)
    if collector.error is not None:
        raise collector.error
    if rc != 0:
        raise PocketLMError(f"{path}: llama.cpp failed on a calibration chunk ({rc}): {engine.recent_log()}")


def read_spec(spec: Path) -> ImportanceMatrix | str:
    """What `--imatrix SPEC` names: an imatrix GGUF, read; else a calibration text, read as
    UTF-8 (checked before a model is prepared to compute the matrix on)."""
    if not spec.is_file():
        raise ModelLoadError(f"{spec}: no such file (--imatrix takes a calibration text or an imatrix GGUF)")
    if is_gguf(spec):
        return ImportanceMatrix.load(spec)
    try:
        return spec.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelLoadError(
            f"{spec}: not UTF-8 text (--imatrix takes a calibration text or an imatrix GGUF)"
        ) from None


def for_quantize(
    spec: Path, model_path: Path, save_to: Path | None, threads: int | None, progress: bool
) -> tuple[ImportanceMatrix, str]:
    """The matrix `--imatrix SPEC` asks for: an imatrix GGUF is read; anything else is
    calibration text, computed on `model_path` (the f32/f16 model) and saved to `save_to`.
    Returns the matrix and what the quantized file records as its source."""
    given = read_spec(spec)
    if isinstance(given, ImportanceMatrix):
        return given, spec.name
    if progress:
        print(f"computing the importance matrix over {spec.name} ...", flush=True)
    matrix = compute(model_path, given, dataset=spec.name, threads=threads, progress=progress)
    if save_to is not None:
        matrix.save(save_to)
    return matrix, spec.name


def saved_name(output: Path) -> Path:
    """Where a computed matrix is kept: beside the quantized file, `<stem>.imatrix.gguf`."""
    return output.with_name(output.name.removesuffix(".gguf") + IMATRIX_SUFFIX)
