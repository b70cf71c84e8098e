"""CTranslate2 model folders: the `model.bin` layout (binary version 6) and PocketLM's metadata.

The writer (`convert/ct2_target.py`) and the runtime both read folders through here.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError, PocketLMError
from .jsonfile import OPTIONAL_STRING, Each, MalformedJSON, Shape, read_json

BINARY_VERSION = 6
DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}
ITEMSIZE = {"float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}


def is_ct2_folder(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "shared_vocabulary.json").is_file()


METADATA_FILE = "pocketlm.json"  # what PocketLM writes into every CTranslate2 folder it makes: its mark
METADATA_SHAPE: dict[str, Shape] = {  # the fields the runtime reads, when present
    "converter?": str,
    "converter_version?": str,
    "format?": str,
    "architecture?": str,
    "quant?": str,
    "tokenizer?": OPTIONAL_STRING,
    "decoder_start_token_id?": int,
    "eos_token_id?": int,
    "pad_token_id?": int,
    "vocab_size?": int,
    "source?": {"repo?": OPTIONAL_STRING, "revision?": OPTIONAL_STRING, "files?": Each(str)},
    "generation_config?": dict,
    "ct2_config?": dict,
}


def read_folder_metadata(folder: Path) -> dict[str, Any]:
    """pocketlm.json when PocketLM made the folder; else what CTranslate2's config says."""
    meta_path = folder / METADATA_FILE
    try:
        if meta_path.is_file():
            return read_json(meta_path, METADATA_SHAPE)
        config = read_json(folder / "config.json", dict)
    except MalformedJSON as e:
        raise ModelLoadError(f"{e} (malformed model metadata)") from None
    except OSError as e:
        raise ModelLoadError(f"{folder}: unreadable model metadata ({e.strerror or e})") from None
    return {"format": "ctranslate2", "architecture": "unknown", "quant": "unknown", "ct2_config": config}


def written_by_pocketlm(folder: Path) -> bool:
    """A CTranslate2 folder PocketLM wrote (so `--force` may replace it): its pocketlm.json says so."""
    try:
        meta = read_json(folder / METADATA_FILE, {"converter": str, "format": str})
    except (OSError, MalformedJSON):
        return False
    return meta["converter"] == "pocketlm" and meta["format"] == "ctranslate2" and is_ct2_folder(folder)


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
