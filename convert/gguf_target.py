"""Writing a `GGUFPlan` as a GGUF file, tensor by tensor, in any supported quant type.

Every tensor is read from the checkpoint in row blocks, encoded by ggml's own routines
(`ggml_quant.py`) into the type llama.cpp's quantizer would give it (`quant_mix.py`), and
written straight into the output: the file `llama-quantize` writes from PocketLM's own
full-precision file (f16 when every source tensor is f16, else f32), without that file.
`llama_quantize` (llama.cpp's quantizer) remains for `pocketlm quantize`, GGUF to GGUF.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from .checkpoint import iter_rows
from .core import engine
from .core.errors import CheckpointError, ModelLoadError, PocketLMError
from .core.formats import FT, GGUF_FILE_TYPES, Q, QuantType
from .core.gguf_file import IMATRIX_KEYS, read_header
from .ggml_quant import Quantizer
from .imatrix import ImportanceMatrix, check_applies, compute, read_spec
from .output import Fallback, fsync_file, partial_sibling, remove, split_siblings
from .plan import GGUFPlan, TensorPlan
from .quant_mix import Choice, Model, Role, choose, role

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CHUNK_BYTES = 32 << 20  # float32 bytes per row block: bounds memory on huge embeddings
QUANTIZE_BUF_BYTES = 64 << 20  # llama.cpp's quantizer slab (its default, 8 GiB, holds whole tensors)
KV_STRING_BYTES = 127  # llama_model_kv_override's string size: imatrix names are cut there by llama-quantize


class TensorTypes(dict[str, Q]):
    """Each tensor's stored type, and for those whose rows did not fit the type the mix
    meant for them, that type (`wanted`)."""

    def __init__(self, types: dict[str, Q], wanted: dict[str, Q] | None = None):
        super().__init__(types)
        self.wanted = dict(wanted or {})


def full_precision(source_dtypes: set[str]) -> Q:
    """The type of matrices in PocketLM's full-precision GGUF of a checkpoint, which
    llama.cpp's quantizer would read: f16 sources lose nothing in f16, the rest needs f32."""
    return Q.F16 if source_dtypes <= {"F16"} else Q.F32


def _model(writer: gguf.GGUFWriter, arch: str) -> Model:
    """The parameters llama.cpp's type choices read, from the keys the plan wrote."""
    kv = writer.kv_data[0]

    def value(key: str, default: int) -> int:
        v = kv.get(f"{arch}.{key}")
        if v is None:
            return default
        v = v.value
        return int(v[0] if isinstance(v, (list, tuple)) else v)  # per-layer arrays: llama.cpp reads layer 0

    return Model(
        arch,
        value("block_count", 1),
        value("attention.head_count", 1),
        value("attention.head_count_kv", value("attention.head_count", 1)),
        value("expert_count", 0),
    )


def _encode(
    rows: np.ndarray,
    qtype: Q,
    scale: float | None,
    stored: Q,
    quantizer: Quantizer,
    imatrix: np.ndarray | None = None,
    what: str = "",
) -> np.ndarray:
    """A block of rows in `qtype`, from the values a full-precision file would hold: scaled,
    and rounded to `stored` (that file's type of the tensor; f16 rows read as such are exact)."""
    exact = rows.dtype == np.float16 and scale is None
    rows = rows.astype(np.float32, copy=False)
    if scale is not None:
        rows = rows * np.float32(scale)
    if stored == Q.F16 and not exact:
        rows = rows.astype(np.float16).astype(np.float32)
    n_per_row = rows.shape[-1] if rows.ndim else 1
    rows = rows.reshape(-1, n_per_row)
    if qtype == Q.F32:
        return np.ascontiguousarray(rows)
    return quantizer.encode(rows, qtype, imatrix, what)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.int64))


def _column_weights(imatrix: ImportanceMatrix | None, means: dict[str, np.ndarray], t: TensorPlan) -> Any:
    """The importance matrix's weights for `t` (None without one), checked as llama.cpp does."""
    weights = means.get(t.name) if imatrix is not None else None
    if weights is not None and weights.size != t.shape[-1]:
        if role(t.name) == Role.TOKEN_EMBD:  # llama.cpp quantizes it without, rather than fail
            return None
        raise PocketLMError(
            f"importance matrix has {weights.size} columns for {t.name}, the tensor {t.shape[-1]} (another model's?)"
        )
    return weights


def write_gguf(
    plan: GGUFPlan,
    path: Path,
    file_type: FT,
    metadata: Callable[[gguf.GGUFWriter], None],
    release: Callable[[str], None],
    progress: bool,
    source: Q = Q.F32,
    threads: int | None = None,
    output_type: Q | None = None,
    imatrix: ImportanceMatrix | None = None,
    imatrix_source: str = "",
    split: SplitLimits | None = None,
) -> TensorTypes:
    """Write every tensor of `plan` to `path` as `file_type`, one row block at a time, in
    the types and order llama.cpp's quantizer would write them from PocketLM's
    full-precision file (matrices in `source`). Returns the tensor types.

    With `split`, the model goes into llama.cpp's split files beside `path`
    (`<stem>-00001-of-0000N.gguf` ...: gguf-py's writer fills each file up to the limits, in
    tensor order; `written_files` lists them)."""
    limits = split or SplitLimits()
    writer = gguf.GGUFWriter(
        path=None, arch=plan.arch, split_max_tensors=limits.max_tensors, split_max_size=limits.max_bytes
    )
    plan.set_parameters(writer)
    metadata(writer)
    # the keys llama-quantize sets, in its order (it moves each key it sets to the end)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(file_type))
    kv = writer.kv_data[0]
    if "pocketlm.quant" in kv:
        kv["pocketlm.quant"] = kv.pop("pocketlm.quant")
    if imatrix is not None:
        writer.add_string(IMATRIX_KEYS["file"], _kv_string(imatrix_source))
        writer.add_string(IMATRIX_KEYS["dataset"], _kv_string((imatrix.datasets or [""])[0]))
        writer.add_uint32(IMATRIX_KEYS["entries"], len(imatrix.sums))
        writer.add_uint32(IMATRIX_KEYS["chunks"], imatrix.chunks)
    stored = {t.name: source if t.is_matrix else Q.F32 for t in plan.tensors}
    choices: dict[str, Choice] = choose(
        [(t.name, t.shape, stored[t.name]) for t in plan.tensors],
        file_type,
        _model(writer, plan.arch),
        output_type,
        imatrix is not None,
    )
    types = TensorTypes({n: c.type for n, c in choices.items()}, {n: c.wanted for n, c in choices.items() if c.wanted})
    by_name = {t.name: t for t in plan.tensors}
    ordered = [by_name[name] for name in choices]  # llama.cpp's order
    for t in ordered:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, types[t.name]), types[t.name])
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    outs = [fout for fout, shard in zip(writer.fout, writer.tensors) for _ in shard]  # each tensor's file
    files = writer.format_shard_names(path)
    means = imatrix.means() if imatrix is not None else {}
    bar = tqdm(ordered, desc="converting", unit="tensor", disable=not progress, leave=False)
    quantizer = Quantizer(threads or os.cpu_count() or 1)
    try:
        for t, fout in zip(bar, outs):
            bar.set_postfix_str(t.name, refresh=False)
            writer.write_padding(fout, fout.tell())
            data = t.load()
            if tuple(data.shape) != t.shape:
                raise CheckpointError(f"tensor {t.name}: produced shape {data.shape}, planned {t.shape}")
            qtype = types[t.name]
            weights = _column_weights(imatrix, means, t) if qtype != stored[t.name] else None
            row_len = int(np.prod(t.shape[1:], dtype=np.int64)) or 1
            written = 0
            for rows in iter_rows(data, max(1, CHUNK_BYTES // (4 * row_len))):
                encoded = _encode(rows, qtype, t.scale, stored[t.name], quantizer, weights, t.name)
                fout.write(encoded.data)
                written += encoded.nbytes
                for source_name in t.sources:  # drop the mapped pages read so far
                    release(source_name)
            if written != _nbytes(t.shape, qtype):
                raise PocketLMError(f"internal error: tensor {t.name} wrote {written} bytes")
            writer.write_padding(fout, written)
    finally:
        quantizer.close()
        bar.close()
        writer.close()
    for file in files:
        fsync_file(file)
    return types


@dataclass(frozen=True)
class SplitLimits:
    """Where a GGUF is split into llama.cpp's split files (0: no limit of that kind)."""

    max_bytes: int = 0  # of tensor data per file (gguf-split's --split-max-size)
    max_tensors: int = 0  # tensors per file (--split-max-tensors)

    def __bool__(self) -> bool:
        return bool(self.max_bytes or self.max_tensors)


def written_files(path: Path) -> list[Path]:
    """The files `write_gguf(path, split=...)` wrote: the split files beside `path` (first
    first), or [path] when the model fitted in one file."""
    return split_siblings(path) or [path]


def _kv_string(value: str) -> str:
    """A string as llama-quantize records it through a key override (at most 127 bytes)."""
    return value.encode()[:KV_STRING_BYTES].decode("utf-8", "ignore")


def verify_gguf(path: Path, expected: TensorTypes, split: bool = False) -> TensorTypes:
    """Re-open a written file (`split`: the split files written for `path`) and check every
    planned tensor is there, in its planned type."""
    found: dict[str, Q] = {}
    for file in written_files(path) if split else [path]:
        try:
            header = read_header(file)
        except ModelLoadError as e:
            raise PocketLMError(f"written file does not read back: {e}") from None
        found |= {t.name: Q(t.type) for t in header.tensors}
    if set(found) != set(expected):
        diff = sorted(set(expected) ^ set(found))
        raise PocketLMError(f"{path}: written file has a different tensor set (e.g. {diff[0]})")
    wrong = [n for n in expected if found[n] != expected[n]]
    if wrong:
        raise PocketLMError(
            f"{path}: {wrong[0]} was written as {found[wrong[0]].name}, planned {expected[wrong[0]].name}"
        )
    return expected


def llama_quantize(
    src: Path,
    dst: Path,
    file_type: FT,
    threads: int | None = None,
    output_type: Q | None = None,
    imatrix: ImportanceMatrix | None = None,
    imatrix_source: str = "",
) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer: `pocketlm quantize` (GGUF to GGUF),
    and the reference the direct writer is tested against. `output_type`: the output head's
    type (a tied head is the token embedding), instead of llama.cpp's choice (q6_k for
    K-quants). `imatrix`: column weights for the rounding error;
    the file then records it under llama-quantize's `quantize.imatrix.*` keys."""
    llama = engine.llama_cpp()
    params = llama.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    if output_type is not None:
        params.output_tensor_type = int(output_type)
    params.nthread = threads or os.cpu_count() or 1
    params.max_buf_size = QUANTIZE_BUF_BYTES
    keep: list[object] = []  # what params point into, alive until the call returns
    # the source's own pocketlm.quant (f16 for a PocketLM intermediate) must not carry over
    overrides: dict[str, str | int] = {"pocketlm.quant": GGUF_FILE_TYPES.get(int(file_type), "")}
    if imatrix is not None:
        params.imatrix, keep = imatrix.quantize_data()
        overrides[IMATRIX_KEYS["file"]] = imatrix_source
        overrides[IMATRIX_KEYS["dataset"]] = (imatrix.datasets or [""])[0]
        overrides[IMATRIX_KEYS["entries"]] = len(imatrix.sums)
        overrides[IMATRIX_KEYS["chunks"]] = imatrix.chunks
    params.kv_overrides = _kv_overrides(llama, overrides)
    keep.append(params.kv_overrides)
    with engine.quiet_c_output():
        rc = llama.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        full = _why_unwritable(dst)
        if full is not None:  # the one line names the output and the cause (atomic_output's)
            raise full
        raise PocketLMError(f"llama.cpp could not quantize to {file_type.name}: {engine.recent_log()}")


def _why_unwritable(path: Path) -> OSError | None:
    """Why `path` could not be written, when its file system or a file-size limit says so
    (llama.cpp's C++ streams report only "iostream error")."""
    try:
        fs = os.statvfs(path.parent)
        size = path.stat().st_size if path.exists() else 0
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    cause = None
    if fs.f_flag & os.ST_RDONLY:
        cause = errno.EROFS
    elif fs.f_bavail * fs.f_frsize < 1 << 20:
        cause = errno.ENOSPC
    elif resource is not None:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and size + (1 << 20) >= limit:
            cause = errno.EFBIG
    return None if cause is None else OSError(cause, os.strerror(cause), str(path))


def _kv_overrides(llama: Any, values: dict[str, str | int]) -> Any:
    """A llama_model_kv_override array (strings cut to KV_STRING_BYTES), ending in an empty key."""
    array = (llama.llama_model_kv_override * (len(values) + 1))()
    for item, (key, value) in zip(array, values.items()):
        item.key = key.encode()
        if isinstance(value, int):
            item.tag, item.value.val_i64 = llama.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            item.tag, item.value.val_str = llama.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:KV_STRING_BYTES]
    return array


def describe_types(types: dict[str, Q]) -> dict[str, int]:
    return dict(Counter(q.name.lower() for q in types.values()))


def fallbacks(plan: GGUFPlan, types: TensorTypes, quant: QuantType) -> list[Fallback]:
    """Matrices whose rows did not fit the type the quant's mix meant for them, and what
    they got instead (llama.cpp's fallbacks)."""
    shapes = {t.name: t.shape for t in plan.tensors}
    return [
        Fallback(
            name,
            quant.name,
            types[name].name.lower(),
            f"row length {shapes[name][-1]} is not a multiple of {wanted.name.lower()}'s "
            f"{gguf.GGML_QUANT_SIZES[wanted][0]}",
        )
        for name, wanted in types.wanted.items()
    ]


def convert_gguf(
    plan: GGUFPlan,
    dest_tmp: Path,
    quant: QuantType,
    metadata: Callable[[gguf.GGUFWriter], None],
    release: Callable[[str], None],
    source_dtypes: set[str],
    progress: bool,
    threads: int | None = None,
    output_type: Q | None = None,
    imatrix: Path | None = None,
    imatrix_save: Path | None = None,
    split: SplitLimits | None = None,
) -> TensorTypes:
    """Produce the final GGUF at `dest_tmp` (verified; with `split`, llama.cpp's split files
    beside it), every tensor quantized as it is streamed. `imatrix`: an imatrix GGUF, or a
    calibration text whose matrix is computed on a temporary full-precision GGUF (removed
    before the output is written) and saved to `imatrix_save`."""
    if imatrix is not None:
        check_applies(quant)
    source = full_precision(source_dtypes)
    matrix, matrix_source = None, ""
    if imatrix is not None:
        matrix, matrix_source = _importance_matrix(
            imatrix, plan, dest_tmp, metadata, release, source, progress, threads, imatrix_save
        )
        if progress:
            print(f"quantizing to {quant.name} ...", flush=True)
    types = write_gguf(
        plan,
        dest_tmp,
        quant.file_type,
        metadata,
        release,
        progress,
        source,
        threads,
        output_type,
        matrix,
        matrix_source,
        split,
    )
    return verify_gguf(dest_tmp, types, bool(split))


def _importance_matrix(
    spec: Path,
    plan: GGUFPlan,
    dest_tmp: Path,
    metadata: Callable[[gguf.GGUFWriter], None],
    release: Callable[[str], None],
    source: Q,
    progress: bool,
    threads: int | None,
    save_to: Path | None,
) -> tuple[ImportanceMatrix, str]:
    """The matrix `--imatrix SPEC` asks for, and what the quantized file records as its source.
    A calibration text needs a model llama.cpp can run: the full-precision GGUF is written
    for it next to the output and removed once the matrix is computed."""
    given = read_spec(spec)
    if isinstance(given, ImportanceMatrix):
        return given, spec.name
    model = partial_sibling(dest_tmp, ".intermediate")
    try:
        file_type = FT.MOSTLY_F16 if source == Q.F16 else FT.ALL_F32
        verify_gguf(model, write_gguf(plan, model, file_type, metadata, release, progress, source, threads))
        if progress:
            print(f"computing the importance matrix over {spec.name} ...", flush=True)
        matrix = compute(model, given, dataset=spec.name, threads=threads, progress=progress)
    finally:
        remove(model)
    if save_to is not None:
        matrix.save(save_to)
    return matrix, spec.name
