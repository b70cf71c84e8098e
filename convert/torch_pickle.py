"""Read `pytorch_model.bin` files without torch and without running their pickle's code.

A modern torch checkpoint is a zip: `<root>/data.pkl` (a pickle of the state dict) beside
`<root>/data/<key>` (one raw storage each). The pickle is read by an unpickler whose
`find_class` admits only the names torch uses to rebuild tensors and `OrderedDict`; any
other global (`os.system`, `builtins.eval`, ...) raises `UnsafePickleError` before anything
is called. Tensors come back as memory-mapped numpy views of their storage.
"""

from __future__ import annotations

import collections
import logging
import math
import mmap
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import CheckpointError, UnsafePickleError

log = logging.getLogger(__name__)

# torch storage class name -> (safetensors-style dtype tag, numpy dtype of the raw storage)
STORAGE_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "FloatStorage": ("F32", np.dtype("<f4")),
    "HalfStorage": ("F16", np.dtype("<f2")),
    "BFloat16Storage": ("BF16", np.dtype("<u2")),
    "DoubleStorage": ("F64", np.dtype("<f8")),
    "LongStorage": ("I64", np.dtype("<i8")),
    "IntStorage": ("I32", np.dtype("<i4")),
    "ShortStorage": ("I16", np.dtype("<i2")),
    "CharStorage": ("I8", np.dtype("i1")),
    "ByteStorage": ("U8", np.dtype("u1")),
    "BoolStorage": ("BOOL", np.dtype("?")),
}
_DTYPE_BY_TORCH_NAME = {
    "float32": "FloatStorage",
    "float": "FloatStorage",
    "float16": "HalfStorage",
    "half": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "float64": "DoubleStorage",
    "double": "DoubleStorage",
    "int64": "LongStorage",
    "long": "LongStorage",
    "int32": "IntStorage",
    "int": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _DType:
    """Stands in for a `torch.float16`-style dtype object inside the pickle."""

    name: str


@dataclass
class _Storage:
    key: str
    storage_type: str
    numel: int


@dataclass
class PickledTensor:
    """A tensor described by the pickle: which storage, where in it, and its view geometry."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES[self.storage.storage_type][0]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> PickledTensor:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("tensor rebuild called without a storage")
    try:
        shape = tuple(int(s) for s in size)
        strides = tuple(int(s) for s in stride)
        offset = int(storage_offset)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"malformed tensor geometry in pickle: {e}") from None
    if len(shape) != len(strides) or offset < 0 or any(s < 0 for s in shape + strides):
        raise CheckpointError("malformed tensor geometry in pickle")
    return PickledTensor(storage, offset, shape, strides)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    # REDUCE hands the callable its pickled args; OrderedDict() with no args is all torch emits.
    return collections.OrderedDict() if not args else collections.OrderedDict(*args[:1])


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})
_ALLOWED_GLOBALS.update({("torch", name): _DType(name) for name in _DTYPE_BY_TORCH_NAME})


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """An unpickler that can rebuild a torch state dict and nothing else.

    Built on the pure-Python unpickler: the C one sizes its memo table by the largest index
    a pickle names, so a forged LONG_BINPUT can make it allocate gigabytes. A state dict's
    pickle is small; the Python one reads it in milliseconds."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            log.warning("refused pickle global %s.%s", module, name)
            raise UnsafePickleError(
                f"refuses to load: the pickle references {module}.{name}, which is not a tensor "
                "type (a checkpoint should hold only tensors; this file may be malicious)"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id in pickle: {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if isinstance(storage_type, _DType):  # torch >= 2 may record a dtype instead of a class
            storage_type = _StorageType(_DTYPE_BY_TORCH_NAME[storage_type.name])
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise CheckpointError(f"unexpected storage reference in pickle: {str(pid)[:80]}")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError("negative or non-integer storage size in pickle")
        return _Storage(key, storage_type.name, numel)


def _stored_member_offset(raw: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """Offset of an uncompressed member's bytes in the zip (after its local header)."""
    start = info.header_offset
    header = raw[start : start + 30]
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"corrupt zip entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + 30 + name_len + extra_len


class TorchZipFile:
    """The tensors of one zip-format `pytorch_model.bin`, read lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            with open(self.path, "rb") as f:
                head = f.read(2)
            if head[:1] == b"\x80":
                raise CheckpointError(
                    f"{self.path}: legacy (non-zip) PyTorch format is unsupported; "
                    "re-save it as safetensors (model.save_pretrained(dir))"
                )
            raise CheckpointError(f"{self.path}: not a PyTorch checkpoint (not a zip file)")
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{self.path}: corrupt zip: {e}") from None
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{self.path}: no data.pkl inside; not a torch.save file")
        self._root = pkl[0].split("/")[0]
        self._infos = {i.filename: i for i in self._zip.infolist()}
        byteorder = self._infos.get(f"{self._root}/byteorder")
        if byteorder is not None and self._zip.read(byteorder).strip() != b"little":
            raise CheckpointError(f"{self.path}: big-endian checkpoints are unsupported")
        try:
            with self._zip.open(pkl[0]) as f:
                state = RestrictedUnpickler(f).load()
        except (CheckpointError, UnsafePickleError):
            raise
        except Exception as e:  # any pickle-level failure is a malformed file, never a crash
            raise CheckpointError(f"{self.path}: unreadable pickle ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: the pickle does not hold a state dict")
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self.tensors: dict[str, PickledTensor] = {
            k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, PickledTensor)
        }
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._storages: dict[str, np.ndarray] = {}

    def _storage_array(self, storage: _Storage) -> np.ndarray:
        arr = self._storages.get(storage.key)
        if arr is not None:
            return arr
        dtype = STORAGE_DTYPES[storage.storage_type][1]
        info = self._infos.get(f"{self._root}/data/{storage.key}")
        if info is None:
            raise CheckpointError(f"{self.path}: storage {storage.key} is missing from the zip")
        if info.file_size != storage.numel * dtype.itemsize:
            raise CheckpointError(
                f"{self.path}: storage {storage.key} has {info.file_size} bytes, "
                f"expected {storage.numel * dtype.itemsize}"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            offset = _stored_member_offset(self._mmap, info)
            if offset + info.file_size > len(self._mmap):
                raise CheckpointError(f"{self.path}: storage {storage.key} runs past end of file")
            arr = np.frombuffer(self._mmap, dtype=dtype, count=storage.numel, offset=offset)
        else:  # compressed members cannot be mapped; rare (torch never compresses)
            arr = np.frombuffer(self._zip.read(info), dtype=dtype)
        self._storages[storage.key] = arr
        return arr

    def array(self, name: str) -> np.ndarray:
        """The tensor's raw values (bf16 as uint16), a view into the mapped file when possible."""
        t = self.tensors[name]
        storage = self._storage_array(t.storage)
        itemsize = storage.dtype.itemsize
        if math.prod(t.shape) > max(storage.size, 1):  # only expanded views can; checkpoints never hold them
            raise CheckpointError(f"{self.path}: tensor {name} has more elements than its storage")
        if t.shape and 0 not in t.shape:
            last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
            if last >= storage.size:
                raise CheckpointError(f"{self.path}: tensor {name} reaches past its storage")
        elif t.offset > storage.size:
            raise CheckpointError(f"{self.path}: tensor {name} starts past its storage")
        base = storage[t.offset :]
        view = np.lib.stride_tricks.as_strided(
            base, shape=t.shape, strides=tuple(s * itemsize for s in t.stride), writeable=False
        )
        return view

    def storage_span(self, name: str) -> tuple[int, int] | None:
        """(file offset, length) of the bytes backing a tensor, for releasing mapped pages."""
        t = self.tensors[name]
        info = self._infos.get(f"{self._root}/data/{t.storage.key}")
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            return None
        return _stored_member_offset(self._mmap, info), info.file_size

    @property
    def mmap(self) -> mmap.mmap:
        return self._mmap

    def close(self) -> None:
        self._storages.clear()
        self._zip.close()
