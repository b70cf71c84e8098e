"""One reader for every Hugging Face checkpoint layout PocketLM converts.

`Checkpoint(folder)` finds `model.safetensors`, sharded safetensors with their index,
`pytorch_model.bin` or its shards, maps the files into memory and hands out tensors one at a
time as numpy arrays that are views of the file (bf16 is widened to float32 row block by row
block, since numpy has no bf16). Converters never see the storage format.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .core.errors import CheckpointError
from .torch_pickle import TorchZipFile

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened by Bf16Array
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER_BYTES = 100 * 1024 * 1024


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class Bf16Array:
    """A bf16 tensor that widens to float32 only the rows it is asked for."""

    dtype = np.dtype(np.float32)

    def __init__(self, bits: np.ndarray):
        self._bits = bits
        self.shape: tuple[int, ...] = bits.shape
        self.ndim = bits.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return bf16_to_f32(self._bits[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = bf16_to_f32(self._bits)
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known from headers alone."""

    name: str
    file: Path
    dtype: str  # safetensors tag: F32, F16, BF16, ...
    shape: tuple[int, ...]


class _File(Protocol):
    def names(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo: ...
    def array(self, name: str) -> np.ndarray: ...
    def release(self, name: str) -> None: ...
    def close(self) -> None: ...


class SafetensorsFile:
    """A memory-mapped .safetensors file; the JSON header is validated before any use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                if size < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes)")
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(MAX_HEADER_BYTES, size - 8):
                    raise CheckpointError(
                        f"{self.path}: safetensors header length {header_len} is larger than the file"
                    )
                header_bytes = f.read(header_len)
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header is not a JSON object")
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._tensors: dict[str, tuple[TensorInfo, int, int]] = {}
        spans = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            info, begin, end = self._parse_entry(name, entry, data_len)
            self._tensors[name] = (info, begin, end)
            spans.append((begin, end, name))
        spans.sort()
        for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{self.path}: tensors {n0} and {n1} overlap")

    def _parse_entry(self, name: str, entry: Any, data_len: int) -> tuple[TensorInfo, int, int]:
        where = f"{self.path}: tensor {name}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise CheckpointError(f"{where}: data offsets {offsets!r} fall outside the file")
        nbytes = SAFETENSORS_DTYPES[dtype].itemsize * math.prod(shape)  # exact: no overflow on huge shapes
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: holds {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} needs {nbytes}"
            )
        return TensorInfo(name, self.path, dtype, tuple(shape)), offsets[0], offsets[1]

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name][0]

    def array(self, name: str) -> np.ndarray:
        info, begin, end = self._tensors[name]
        dtype = SAFETENSORS_DTYPES[info.dtype]
        flat = np.frombuffer(
            self._mmap,
            dtype=dtype,
            count=(end - begin) // dtype.itemsize,
            offset=self._data_start + begin,
        )
        return flat.reshape(info.shape)

    def release(self, name: str) -> None:
        _, begin, end = self._tensors[name]
        _drop_pages(self._mmap, self._data_start + begin, end - begin)

    def close(self) -> None:
        pass  # numpy views may outlive us; the mapping closes when the last one goes


class TorchBinFile:
    """Adapter giving a `pytorch_model.bin` the same interface as a safetensors file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._zip = TorchZipFile(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None

    def names(self) -> list[str]:
        return list(self._zip.tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._zip.tensors[name]
        return TensorInfo(name, self.path, t.dtype, t.shape)

    def array(self, name: str) -> np.ndarray:
        return self._zip.array(name)

    def release(self, name: str) -> None:
        span = self._zip.storage_span(name)
        if span is not None:
            _drop_pages(self._zip.mmap, *span)

    def close(self) -> None:
        self._zip.close()


def _drop_pages(mm: mmap.mmap, offset: int, length: int) -> None:
    """Tell the kernel we are done with a tensor's pages so they leave our resident set."""
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or length <= 0:
        return
    start = offset - offset % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, min(length + offset - start, len(mm) - start))
    except (OSError, ValueError):
        pass


# Besides the weights, the files that define a model (what the hub downloads, what is hashed)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
)
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def _safe_member(folder: Path, name: Any, index_file: Path) -> Path:
    """A file named by an index, refused if it would leave the model folder."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{index_file}: invalid shard name {name!r}")
    candidate = (folder / name).resolve()
    if candidate.parent != folder.resolve() or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{index_file}: shard name {name!r} points outside the model folder")
    return candidate


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({type(e).__name__})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder (its index's shards, or the single file), all
    present; a CheckpointError names what is missing. Nothing is opened but the index."""
    for index_name, single_name in WEIGHT_LAYOUTS:
        index_path = folder / index_name
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map")
            files = sorted({_safe_member(folder, n, index_path) for n in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: shard listed in {index_path.name} is missing")
            return files
        single = folder / single_name
        if single.is_file():
            return [single]
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)"
    )


class Checkpoint:
    """The config and weights of a Hugging Face model folder, read lazily.

    Safetensors is preferred when a folder holds both formats. Names are exactly as stored.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder (expected a Hugging Face model folder)")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing; not a Hugging Face model folder")
        self.config: dict[str, Any] = read_json(config_path)
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object")
        self.weight_files = find_weight_files(self.folder)
        self._files: dict[Path, _File] = {}
        self._where: dict[str, Path] = {}
        for path in self.weight_files:
            handle = self._open(path)
            for name in handle.names():
                self._where[name] = path
        if not self._where:
            raise CheckpointError(f"{self.folder}: the weight files hold no tensors")

    def _open(self, path: Path) -> _File:
        handle = self._files.get(path)
        if handle is None:
            handle = SafetensorsFile(path) if path.suffix == ".safetensors" else TorchBinFile(path)
            self._files[path] = handle
        return handle

    @property
    def storage_format(self) -> str:
        return "safetensors" if self.weight_files[0].suffix == ".safetensors" else "pytorch"

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._open(self._where_or_raise(name)).info(name)

    def _where_or_raise(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing from the checkpoint") from None

    def get(self, name: str) -> np.ndarray | Bf16Array:
        """A tensor as a float array view (f32/f16 as stored, bf16 widened lazily)."""
        path = self._where_or_raise(name)
        handle = self._open(path)
        info = handle.info(name)
        raw = handle.array(name)
        if info.dtype == "BF16":
            return Bf16Array(raw)
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has non-float dtype {info.dtype}")
        return raw

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor that has been written out."""
        path = self._where.get(name)
        if path is not None:
            self._open(path).release(name)

    def source_files(self) -> list[Path]:
        """Every file that defines the model: config, tokenizer files, index and weights."""
        extra = [*MODEL_FILES, *(i for i, _ in WEIGHT_LAYOUTS)]
        files = {self.folder / n for n in extra if (self.folder / n).is_file()}
        files.update(self.weight_files)
        return sorted(files)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})")


def source_identity(folder: Path, config: dict[str, Any]) -> tuple[str | None, str | None]:
    """(repo id, revision) when the folder is a Hugging Face cache snapshot or names its repo."""
    m = _HF_CACHE_SNAPSHOT.search(Path(folder).resolve().as_posix())
    if m:
        return f"{m['org']}/{m['name']}", m["rev"]
    name = config.get("_name_or_path")
    if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name, None
    return None, None


def iter_rows(arr: np.ndarray | Bf16Array, rows_per_chunk: int) -> Iterator[np.ndarray]:
    """Yield an array in blocks of leading-axis rows, so huge tensors never materialize whole."""
    if arr.ndim == 0:
        yield np.asarray(arr)
        return
    for start in range(0, arr.shape[0], rows_per_chunk):
        yield np.asarray(arr[start : start + rows_per_chunk])


_NUMPY_TO_SAFETENSORS = {np.dtype(v).str: k for k, v in SAFETENSORS_DTYPES.items() if k != "BF16"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write numpy arrays as a .safetensors file (used for synthetic checkpoints)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, arr in tensors.items():
        nbytes = arr.nbytes
        header[name] = {
            "dtype": _NUMPY_TO_SAFETENSORS[arr.dtype.newbyteorder("<").str],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
