"""Writing a CTranslate2 model folder, one variable at a time.

`ctranslate2.specs` describes the model (variable names, which weights are quantizable, the
config), but its `optimize()`/`save()` hold every weight in memory and quantize in place.
This writer keeps the spec and streams the documented `model.bin` layout instead
(binary version 6): each weight is read in row blocks, quantized with CTranslate2's own
rules (per-row int8 scales, one int16 scale per tensor) and written before the next is read.
Weights shared between slots (tied embeddings, the relative attention bias of every layer)
are written once and aliased, as CTranslate2's converter does.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from .checkpoint import iter_rows
from .core import engine
from .core.ct2_file import BINARY_VERSION, DTYPE_IDS, ITEMSIZE, METADATA_FILE, read_model_bin
from .core.errors import PocketLMError, UnsupportedModelError
from .core.formats import FORMATS
from .output import fsync_file
from .plan import CT2Plan, TensorPlan

log = logging.getLogger(__name__)

CHUNK_BYTES = 32 << 20
SOURCE_FLOAT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), as raw uint16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    return (rounded >> 16).astype(np.uint16)


def _cast(rows: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return f32_to_bf16_bits(rows)
    return rows.astype(dtype, copy=False)


def _int8_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CTranslate2's per-row int8 quantization: scale = 127 / max|row|."""
    amax = np.amax(np.absolute(rows), axis=1)
    amax[amax == 0] = 127.0
    amax = np.maximum(amax, np.float32(127) / np.finfo(np.float32).max)
    scale = (np.float32(127.0) / amax).astype(np.float32)
    return np.rint(rows * scale[:, None]).astype(np.int8), scale


@dataclass
class _Variable:
    """One entry of model.bin: its name, stored dtype and shape, and a way to write its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    write: Callable[[BinaryIO], None]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]


class _Streamer:
    """Turns spec entries into `_Variable`s following CTranslate2's quantization rules."""

    def __init__(self, quant: str, source_dtype: Callable[[TensorPlan], str], release: Callable[[str], None]):
        self.quant, self.source_dtype, self.release = quant, source_dtype, release

    def _blocks(self, t: TensorPlan) -> Iterator[np.ndarray]:
        data = t.load()
        row = int(np.prod(t.shape[1:], dtype=np.int64)) or 1
        for rows in iter_rows(data, max(1, CHUNK_BYTES // (4 * row))):
            rows = rows.astype(np.float32, copy=False)
            yield rows * np.float32(t.scale) if t.scale is not None else rows
            for source in t.sources:
                self.release(source)

    def variables(self, name: str, t: TensorPlan, quantizable: bool) -> list[_Variable]:
        q = self.quant
        if quantizable and q.startswith("int8"):
            scales: list[np.ndarray] = []

            def write_int8(f: BinaryIO) -> None:
                for rows in self._blocks(t):
                    values, scale = _int8_rows(rows.reshape(rows.shape[0], -1))
                    f.write(values.tobytes())
                    scales.append(scale)

            def write_scale(f: BinaryIO) -> None:
                f.write(np.concatenate(scales).astype(np.float32).tobytes())

            return [
                _Variable(name, "int8", t.shape, write_int8),
                _Variable(f"{name}_scale", "float32", (t.shape[0],), write_scale),
            ]
        if quantizable and q == "int16":
            amax = [0.0]

            def write_int16(f: BinaryIO) -> None:
                amax[0] = max(float(np.amax(np.absolute(rows))) for rows in self._blocks(t))
                scale = np.float32(2**10 / amax[0])
                for rows in self._blocks(t):
                    f.write(np.clip(np.rint(rows * scale), -32768, 32767).astype(np.int16).tobytes())

            def write_scale(f: BinaryIO) -> None:
                f.write(np.float32(2**10 / amax[0]).tobytes())

            return [
                _Variable(name, "int16", t.shape, write_int16),
                _Variable(f"{name}_scale", "float32", (), write_scale),
            ]
        if quantizable and q in ("float16", "bfloat16", "float32"):
            dtype = q
        elif q in ("float16", "int8_float16"):
            dtype = "float16"
        elif q in ("bfloat16", "int8_bfloat16"):
            dtype = "bfloat16"
        elif q in ("float32", "int16", "int8_float32"):
            dtype = "float32"
        else:  # plain int8 keeps the other weights in the checkpoint's dtype
            dtype = self.source_dtype(t)

        def write_cast(f: BinaryIO) -> None:
            for rows in self._blocks(t):
                f.write(_cast(rows, dtype).tobytes())

        return [_Variable(name, dtype, t.shape, write_cast)]


def _scalar_variable(name: str, value: Any) -> _Variable:
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if array.dtype.name not in DTYPE_IDS:
        raise PocketLMError(f"internal error: spec value {name} has dtype {array.dtype}")
    return _Variable(name, array.dtype.name, array.shape, lambda f, a=array: f.write(a.tobytes()))


def _write_string(f: BinaryIO, text: str) -> None:
    data = text.encode("utf-8")
    f.write(struct.pack("<H", len(data) + 1) + data + b"\0")


def collect(
    plan: CT2Plan, quant: str, source_dtype: Callable[[TensorPlan], str], release: Callable[[str], None]
) -> tuple[list[_Variable], list[tuple[str, str]]]:
    """Validate the spec and list what model.bin will hold: variables, then aliases."""
    ct2 = engine.ctranslate2(specs=True)
    index_spec = ct2.specs.model_spec.index_spec
    try:
        plan.spec.validate()
    except ValueError as e:
        raise UnsupportedModelError(f"CTranslate2 spec incomplete: {e}") from None
    streamer = _Streamer(quant, source_dtype, release)
    variables: list[_Variable] = []
    aliases: list[tuple[str, str]] = []
    first_name: dict[int, str] = {}
    for name, value in plan.spec.variables(ordered=True):
        if isinstance(value, TensorPlan):
            if id(value) in first_name:  # shared weight: alias the first name (alphabetical)
                aliases.append((name, first_name[id(value)]))
                continue
            first_name[id(value)] = name
            scope, attr = name.rsplit("/", 1)
            quantizable = hasattr(index_spec(plan.spec, scope), f"{attr}_scale")
            variables.extend(streamer.variables(name, value, quantizable))
        else:
            variables.append(_scalar_variable(name, value))
    return variables, aliases


def write_model_bin(
    path: Path, spec: Any, variables: list[_Variable], aliases: list[tuple[str, str]], progress: bool
) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<I", BINARY_VERSION))
        _write_string(f, spec.name)
        f.write(struct.pack("<I", spec.revision))
        f.write(struct.pack("<I", len(variables)))
        bar = tqdm(variables, desc="converting", unit="var", disable=not progress, leave=False)
        for var in bar:
            if var.nbytes >= 2**32:
                raise UnsupportedModelError(f"variable {var.name} is over 4 GiB, beyond CTranslate2's format")
            _write_string(f, var.name)
            f.write(struct.pack("<B", len(var.shape)))
            for dim in var.shape:
                f.write(struct.pack("<I", dim))
            f.write(struct.pack("<B", DTYPE_IDS[var.dtype]))
            f.write(struct.pack("<I", var.nbytes))
            start = f.tell()
            var.write(f)
            if f.tell() - start != var.nbytes:
                raise PocketLMError(f"internal error: {var.name} wrote {f.tell() - start} of {var.nbytes} bytes")
        bar.close()
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases:
            _write_string(f, alias)
            _write_string(f, target)
    fsync_file(path)


def write_ct2(
    plan: CT2Plan,
    folder: Path,
    quant: str,
    source_dtype: Callable[[TensorPlan], str],
    release: Callable[[str], None],
    metadata: dict[str, Any],
    progress: bool,
) -> dict[str, int]:
    """Write the whole model folder into `folder` (created) and verify it; returns dtype counts."""
    quant = FORMATS["ct2"].quant(quant)
    folder.mkdir()
    variables, aliases = collect(plan, quant, source_dtype, release)
    write_model_bin(folder / "model.bin", plan.spec, variables, aliases, progress)
    written, written_aliases = read_model_bin(folder / "model.bin")
    if set(written) != {v.name for v in variables} or len(written_aliases) != len(aliases):
        raise PocketLMError(f"{folder}: model.bin does not read back as written")

    config = plan.spec.config.to_dict()
    config.update(plan.config)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "shared_vocabulary.json").write_text(json.dumps(plan.vocabulary, ensure_ascii=False) + "\n")
    for name, source in plan.files.items():
        (folder / name).write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    info = {**metadata, **plan.runtime, "format": "ctranslate2", "quant": quant}
    (folder / METADATA_FILE).write_text(json.dumps(info, indent=2) + "\n")
    counts: dict[str, int] = {}
    for dtype, _ in written.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def source_float_dtype(dtypes: set[str]) -> str:
    """The CTranslate2 dtype matching a set of checkpoint dtypes (the widest wins)."""
    if not dtypes or dtypes & {"F32", "F64"} or len(dtypes) > 1:
        return "float32"
    return SOURCE_FLOAT[next(iter(dtypes))]
