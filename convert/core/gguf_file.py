"""A small, strict reader of GGUF headers: metadata and tensor table, checked against the file.

gguf-py's `GGUFReader` builds a numpy view per token string (hundreds of MB for a 250k
vocabulary); this reads the header once, skips or summarises large arrays, and checks
every tensor's type, shape and data range lie inside the file. It is how PocketLM verifies
what it wrote and refuses a corrupt file before llama.cpp sees it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .errors import ModelLoadError

MAGIC = b"GGUF"
IMATRIX_TYPE = "imatrix"  # general.type of an importance matrix GGUF (convert/imatrix.py)
IMATRIX_SUFFIX = ".imatrix.gguf"  # an importance matrix kept beside its model
# What llama.cpp's quantizer records about the importance matrix it used (llama-quantize's keys).
IMATRIX_KEYS = {
    "file": "quantize.imatrix.file",
    "dataset": "quantize.imatrix.dataset",
    "entries": "quantize.imatrix.entries_count",
    "chunks": "quantize.imatrix.chunks_count",
}
VERSIONS = (2, 3)
MAX_DIMS = 4
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    type: gguf.GGMLQuantizationType
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]  # arrays that were summarised instead of kept
    tensors: list[TensorEntry]
    data_offset: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: corrupt GGUF ({what} at byte {self.pos})")

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise self.fail("truncated header")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise self.fail("string longer than the file")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            n = self.take("<Q")
            if self.pos + n > len(self.buf):
                raise self.fail("string longer than the file")
            self.pos += n

    def value(self, vtype: int, keep_arrays: bool, key: str, lengths: dict[str, int]) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise self.fail(f"unknown value type {vtype} for {key}")
        itype, count = self.take("<I"), self.take("<Q")
        if count > len(self.buf):
            raise self.fail(f"array {key} claims {count} items")
        if itype in _SCALARS:
            size = struct.calcsize(_SCALARS[itype]) * count
            if self.pos + size > len(self.buf):
                raise self.fail(f"array {key} runs past the end")
            if keep_arrays or count <= 64:
                items = list(struct.unpack_from(f"<{count}{_SCALARS[itype][1]}", self.buf, self.pos))
                self.pos += size
                return items
            self.pos += size
        elif itype == STRING:
            if keep_arrays or count <= 64:
                return [self.string() for _ in range(count)]
            self.skip_strings(count)
        else:
            raise self.fail(f"unsupported array item type {itype} for {key}")
        lengths[key] = count
        return None


def read_header(path: str | Path, keep_arrays: bool = False) -> GGUFHeader:
    """Parse and check a GGUF file's header. Arrays over 64 items are kept only if asked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if path.stat().st_size < 24:
                raise ModelLoadError(f"{path}: too small to be a GGUF file")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return _parse(_Cursor(buf, path), keep_arrays)
    finally:
        buf.close()


def _parse(c: _Cursor, keep_arrays: bool) -> GGUFHeader:
    if c.buf[:4] != MAGIC:
        raise ModelLoadError(f"{c.path}: not a GGUF file (bad magic)")
    c.pos = 4
    version = c.take("<I")
    if version not in VERSIONS:
        raise ModelLoadError(f"{c.path}: unsupported GGUF version {version}")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    size = len(c.buf)
    if n_tensors > size // 24 or n_kv > size // 12:
        raise c.fail(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = c.string()
        value = c.value(c.take("<I"), keep_arrays, key, lengths)
        if value is not None:
            metadata[key] = value
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"invalid alignment {alignment!r}")
    raw = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(c.take("<Q") for _ in range(n_dims))
        type_id = c.take("<I")
        rel = c.take("<Q")
        raw.append((name, shape, type_id, rel))
    data_offset = c.pos + (-c.pos % alignment)
    tensors, spans = [], []
    for name, shape, type_id, rel in raw:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {name} has unknown type {type_id}") from None
        if shape[0] % block:
            raise c.fail(f"tensor {name} row of {shape[0]} does not fit {qtype.name} blocks")
        n = 1
        for d in shape:
            n *= d
        nbytes = n // block * type_size
        start = data_offset + rel
        if rel % alignment or start + nbytes > size:
            raise ModelLoadError(f"{c.path}: tensor {name} data lies outside the file (truncated or corrupt download?)")
        tensors.append(TensorEntry(name, shape, qtype, start, nbytes))
        spans.append((start, start + nbytes, name))
    if len({t.name for t in tensors}) != len(tensors):
        raise c.fail("duplicate tensor names")
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ModelLoadError(f"{c.path}: tensors {a} and {b} overlap")
    return GGUFHeader(version, metadata, lengths, tensors, data_offset)
