"""What a model path holds: the one place a file or folder's format is told and its metadata read.

`inspect()` asks every backend whether the path is in one of its formats (a GGUF file, a
CTranslate2 folder, ...); a folder with a config.json is a Hugging Face checkpoint, converted
on first use. A model split in several GGUF files is one model, named by any of its files
(convert/core/gguf_split.py): its source is the first file, its size and tensors all of them.
The result carries the metadata, so `load()`, `pocketlm info`, the hub and the cache read a
header once.
"""

from __future__ import annotations

from pathlib import Path

from pocketlm.backends import backends
from pocketlm.converters.core.errors import ModelLoadError
from pocketlm.loading.facts import HF, ModelSource


def inspect(path: Path, quant: str | None = None) -> ModelSource:
    """The model at `path`, or an error saying why it is none PocketLM can run.

    `quant` is what a checkpoint folder is to be converted to (None: the default)."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_file():
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None
    for backend in backends():
        found = backend.inspect(path)
        if found is not None:
            return found
    if path.is_dir() and (path / "config.json").is_file():
        return _checkpoint(path, quant)
    if path.is_file():
        raise ModelLoadError(
            f"{path}: not a model file PocketLM runs (not a GGUF file: bad magic); is it a model file?"
        )
    raise ModelLoadError(f"{path}: this folder holds no model PocketLM can run")


def _checkpoint(folder: Path, quant: str | None) -> ModelSource:
    from pocketlm.converters.architectures import resolve
    from pocketlm.converters.checkpoint import read_json

    config = read_json(folder / "config.json")
    arch = resolve(config, str(folder / "config.json"))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return ModelSource(folder, HF, arch.name, quant, size, metadata=config)
