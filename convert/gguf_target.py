"""Writing a `GGUFPlan` as a GGUF file, tensor by tensor, in any supported quant type.

f32/f16/bf16/q8_0 are encoded here (q8_0 bytes are identical to llama.cpp's); every other
type is produced by llama.cpp's own quantizer from an intermediate f32/f16 file written the
same way, which is removed afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections import Counter
from collections.abc import Callable
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
from .imatrix import ImportanceMatrix, check_applies, for_quantize
from .output import Fallback, fsync_file, partial_sibling, remove
from .plan import GGUFPlan, TensorPlan

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CHUNK_BYTES = 32 << 20  # float32 bytes per row block: bounds memory on huge embeddings
QUANTIZE_BUF_BYTES = 64 << 20  # llama.cpp's quantizer slab (its default, 8 GiB, holds whole tensors)


def _tensor_type(t: TensorPlan, want: Q) -> Q:
    """The type a tensor is written in: vectors stay f32; rows must fit the block size."""
    if not t.is_matrix:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[want][0]
    if t.shape[-1] % block:
        return Q.F16
    return want


def _encode(rows: np.ndarray, qtype: Q, scale: float | None) -> np.ndarray:
    rows = rows.astype(np.float32, copy=False)
    if scale is not None:
        rows = rows * np.float32(scale)
    return gguf.quants.quantize(rows, qtype)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.int64))


def write_gguf(
    plan: GGUFPlan,
    path: Path,
    want: Q,
    file_type: FT,
    metadata: Callable[[gguf.GGUFWriter], None],
    release: Callable[[str], None],
    progress: bool,
) -> dict[str, Q]:
    """Write every tensor of `plan` to `path`, one row block at a time. Returns tensor types."""
    writer = gguf.GGUFWriter(path=None, arch=plan.arch)
    plan.set_parameters(writer)
    metadata(writer)
    writer.add_file_type(int(file_type))
    if want not in (Q.F32, Q.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types = {t.name: _tensor_type(t, want) for t in plan.tensors}
    for t in plan.tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, types[t.name]), types[t.name])
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    bar = tqdm(plan.tensors, desc="converting", unit="tensor", disable=not progress, leave=False)
    try:
        for t in bar:
            bar.set_postfix_str(t.name, refresh=False)
            writer.write_padding(fout, fout.tell())
            data = t.load()
            if tuple(data.shape) != t.shape:
                raise CheckpointError(f"tensor {t.name}: produced shape {data.shape}, planned {t.shape}")
            row_len = int(np.prod(t.shape[1:], dtype=np.int64)) or 1
            written = 0
            for rows in iter_rows(data, max(1, CHUNK_BYTES // (4 * row_len))):
                encoded = _encode(rows, types[t.name], t.scale)
                fout.write(encoded.tobytes())
                written += encoded.nbytes
                for source in t.sources:  # drop the mapped pages read so far
                    release(source)
            if written != _nbytes(t.shape, types[t.name]):
                raise PocketLMError(f"internal error: tensor {t.name} wrote {written} bytes")
            writer.write_padding(fout, written)
    finally:
        bar.close()
        writer.close()
    fsync_file(path)
    return types


def verify_gguf(path: Path, expected: dict[str, Q]) -> dict[str, Q]:
    """Re-open a written file and check every planned tensor is there, inside the file."""
    try:
        header = read_header(path)
    except ModelLoadError as e:
        raise PocketLMError(f"written file does not read back: {e}") from None
    found = {t.name: t.type for t in header.tensors}
    if set(found) != set(expected):
        diff = sorted(set(expected) ^ set(found))
        raise PocketLMError(f"{path}: written file has a different tensor set (e.g. {diff[0]})")
    return found


def llama_quantize(
    src: Path,
    dst: Path,
    file_type: FT,
    threads: int | None = None,
    output_type: Q | None = None,
    imatrix: ImportanceMatrix | None = None,
    imatrix_source: str = "",
) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (K-quants have no Python encoder).
    `output_type`: the output head's type (a tied head is the token embedding), instead of
    llama.cpp's choice (q6_k for K-quants). `imatrix`: column weights for the rounding error;
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
    """A llama_model_kv_override array (strings at most 127 bytes), ending in an empty key."""
    array = (llama.llama_model_kv_override * (len(values) + 1))()
    for item, (key, value) in zip(array, values.items()):
        item.key = key.encode()
        if isinstance(value, int):
            item.tag, item.value.val_i64 = llama.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            item.tag, item.value.val_str = llama.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
    return array


def describe_types(types: dict[str, Q]) -> dict[str, int]:
    return dict(Counter(q.name.lower() for q in types.values()))


def fallbacks(plan: GGUFPlan, types: dict[str, Q], quant: QuantType) -> list[Fallback]:
    """Matrices whose rows did not fit the quant's block size, and what they got instead."""
    out = []
    for t in plan.tensors:
        if t.is_matrix and t.shape[-1] % quant.block:
            out.append(
                Fallback(
                    t.name,
                    quant.name,
                    types[t.name].name.lower(),
                    f"row length {t.shape[-1]} is not a multiple of {quant.block}",
                )
            )
    return out


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
) -> dict[str, Q]:
    """Produce the final GGUF at `dest_tmp` (verified), directly or through llama.cpp (always
    when the output head gets a type of its own). `imatrix`: a calibration text (the matrix
    is computed on the intermediate file and saved to `imatrix_save`) or an imatrix GGUF."""
    if imatrix is not None:
        check_applies(quant)
    if quant.direct is not None and output_type is None:
        types = write_gguf(plan, dest_tmp, quant.direct, quant.file_type, metadata, release, progress)
        return verify_gguf(dest_tmp, types)
    # f16 sources lose nothing in an f16 intermediate; anything else goes through f32.
    inter_q, inter_ft = (Q.F16, FT.MOSTLY_F16) if source_dtypes <= {"F16"} else (Q.F32, FT.ALL_F32)
    intermediate = partial_sibling(dest_tmp, ".intermediate")
    try:
        types = write_gguf(plan, intermediate, inter_q, inter_ft, metadata, release, progress)
        verify_gguf(intermediate, types)
        matrix, source = for_quantize(imatrix, intermediate, imatrix_save, threads, progress) if imatrix else (None, "")
        if progress:
            print(f"quantizing to {quant.name} with llama.cpp ...", flush=True)
        llama_quantize(intermediate, dest_tmp, quant.file_type, threads, output_type, matrix, source)
    finally:
        remove(intermediate)
    return verify_gguf(dest_tmp, types)
