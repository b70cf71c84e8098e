"""CTranslate2 model folders: the `model.bin` layout (binary version 6) and PocketLM's metadata.

The writer (`convert/ct2_target.py`) and the runtime both read folders through here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError, PocketLMError

BINARY_VERSION = 6
DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}
ITEMSIZE = {"float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}


def is_ct2_folder(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "shared_vocabulary.json").is_file()


def read_folder_metadata(folder: Path) -> dict[str, Any]:
    """pocketlm.json when PocketLM made the folder; else what CTranslate2's config says."""
    meta_path = folder / "pocketlm.json"
    try:
        if meta_path.is_file():
            return json.loads(meta_path.read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder}: unreadable model metadata ({e})") from None
    return {"format": "ctranslate2", "architecture": "unknown", "quant": "unknown", "ct2_config": config}


def read_model_bin(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """The variables (dtype, shape) and aliases of a model.bin, checked against its size."""
    names = {v: k for k, v in DTYPE_IDS.items()}
    size = path.stat().st_size
    variables: dict[str, tuple[str, tuple[int, ...]]] = {}
    aliases: dict[str, str] = {}
    with open(path, "rb") as f:

        def take(fmt: str) -> Any:
            raw = f.read(struct.calcsize(fmt))
            if len(raw) != struct.calcsize(fmt):
                raise PocketLMError(f"{path}: truncated model.bin")
            return struct.unpack(fmt, raw)[0]

        def string() -> str:
            n = take("<H")
            return f.read(n)[:-1].decode("utf-8", "replace")

        if take("<I") != BINARY_VERSION:
            raise PocketLMError(f"{path}: unsupported CTranslate2 binary version")
        string()
        take("<I")
        for _ in range(take("<I")):
            name = string()
            shape = tuple(take("<I") for _ in range(take("<B")))
            dtype = names.get(take("<B"))
            nbytes = take("<I")
            if (
                dtype is None
                or nbytes != int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
                or f.tell() + nbytes > size
            ):
                raise PocketLMError(f"{path}: variable {name} is malformed or truncated")
            f.seek(nbytes, 1)
            variables[name] = (dtype, shape)
        for _ in range(take("<I")):
            alias = string()
            aliases[alias] = string()
        if f.tell() != size:
            raise PocketLMError(f"{path}: trailing bytes after the aliases")
    return variables, aliases
