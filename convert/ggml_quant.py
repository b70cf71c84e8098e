"""ggml's own quantization routines, from the libggml-base that llama-cpp-python ships.

`llama_model_quantize` encodes every tensor with `ggml_quantize_chunk`; calling the same
function on the same float32 rows (and the same importance-matrix column weights) gives the
same bytes, so PocketLM writes any GGUF type while streaming, with no intermediate file.
Each call covers whole rows and every row is encoded on its own, so a tensor can be encoded
in row blocks, and a block split between threads (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gguf
import numpy as np

from .core import engine
from .core.errors import PocketLMError

Q = gguf.GGMLQuantizationType

_STATE: dict[str, Any] = {}
MIN_ROWS_PER_THREAD = 16  # below this, a thread costs more than it saves
# every type a PocketLM GGUF may hold (quant_mix's choices and fallbacks)
WRITTEN = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def library() -> Any:
    """libggml-base, with the signatures of the functions PocketLM calls in it."""
    lib = _STATE.get("lib")
    if lib is not None:
        return lib
    engine.llama_cpp()  # a clear error when llama-cpp-python is missing; ggml's backends loaded
    from llama_cpp import _ctypes_extensions
    from llama_cpp._ggml import libggml_base_path

    lib = _ctypes_extensions.load_shared_library("ggml-base", libggml_base_path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start (elements)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (n_per_row weights, or NULL)
    ]
    lib.ggml_quantize_requires_imatrix.restype, lib.ggml_quantize_requires_imatrix.argtypes = (
        ctypes.c_bool,
        [ctypes.c_int],
    )
    lib.ggml_quantize_init.restype, lib.ggml_quantize_init.argtypes = None, [ctypes.c_int]
    lib.ggml_row_size.restype, lib.ggml_row_size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype, lib.ggml_blck_size.argtypes = ctypes.c_int64, [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    # the gguf package numbers and sizes the types PocketLM writes as this ggml does
    for q in WRITTEN:
        block, size = gguf.GGML_QUANT_SIZES[q]
        if (lib.ggml_blck_size(int(q)), lib.ggml_row_size(int(q), block)) != (block, size):
            raise PocketLMError(f"this llama.cpp build's ggml numbers tensor types differently from gguf ({q.name})")
    _STATE["lib"] = lib
    return lib


def row_bytes(qtype: Q, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` values in `qtype`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return n_per_row // block * size


def fits(qtype: Q, n_per_row: int) -> bool:
    """Whether rows of this length are whole blocks of `qtype`."""
    return n_per_row % gguf.GGML_QUANT_SIZES[qtype][0] == 0


class Quantizer:
    """Encodes float32 rows with `ggml_quantize_chunk`, split over `threads` threads."""

    def __init__(self, threads: int = 1):
        self.lib = library()
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, rows: np.ndarray, qtype: Q, imatrix: np.ndarray | None = None, what: str = "") -> np.ndarray:
        """`rows` ([n, n_per_row] float32) in `qtype`: uint8 [n, row bytes], as llama.cpp
        writes them. `imatrix`: n_per_row column weights (the quantizer's importance matrix)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise PocketLMError(f"internal error: {what} rows have shape {rows.shape}")
        n_rows, n_per_row = rows.shape
        if not fits(qtype, n_per_row):  # ggml does not check (its asserts are compiled out)
            raise PocketLMError(f"{what}: rows of {n_per_row} values cannot be stored as {qtype.name}")
        weights = None
        if imatrix is not None:
            weights = np.ascontiguousarray(imatrix, dtype=np.float32)
            if weights.shape != (n_per_row,):
                raise PocketLMError(f"{what}: importance matrix has {weights.size} columns, the tensor {n_per_row}")
        elif self.lib.ggml_quantize_requires_imatrix(int(qtype)):
            raise PocketLMError(f"{what}: {qtype.name} needs an importance matrix")
        self.lib.ggml_quantize_init(int(qtype))  # tables of the i-quants, once; not thread-safe lazily
        row_size = row_bytes(qtype, n_per_row)
        out = np.empty((n_rows, row_size), dtype=np.uint8)
        parts = min(self.threads, max(1, n_rows // MIN_ROWS_PER_THREAD))
        bounds = np.linspace(0, n_rows, parts + 1, dtype=np.int64)
        spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

        def run(span: tuple[int, int]) -> bool:
            first, end = span
            dst = out.ctypes.data + first * row_size
            size = self.lib.ggml_quantize_chunk(
                int(qtype),
                rows.ctypes.data + first * n_per_row * 4,
                dst,
                0,
                end - first,
                n_per_row,
                None if weights is None else weights.ctypes.data,
            )
            return size == (end - first) * row_size and self.lib.ggml_validate_row_data(int(qtype), dst, size)

        results = list(self._pool.map(run, spans) if self._pool is not None and len(spans) > 1 else map(run, spans))
        if not all(results):  # llama.cpp refuses the same (non-finite scales: NaN or infinite weights)
            raise PocketLMError(f"{what}: quantized data validation failed (are there NaN or infinite weights?)")
        return out
