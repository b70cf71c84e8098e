"""`load()`: open anything PocketLM can run and pick how to run it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from convert.errors import ModelLoadError
from convert.gguf_file import MAGIC as GGUF_MAGIC
from convert.gguf_file import read_header

from .model import Model
from .platform import choose, detect_facts


def detect_format(path: Path) -> str:
    """'gguf' for a GGUF file whose header and tensor table check out; else a clear error."""
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic); is it a model file?")
        read_header(path)  # refuses truncated/corrupt files before llama.cpp sees them
        return "gguf"
    if path.is_dir():
        if (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path}: a Hugging Face checkpoint; convert it first: pocketlm convert {path} -o model.gguf"
            )
        raise ModelLoadError(f"{path}: folder holds no model PocketLM can run")
    raise ModelLoadError(f"{path}: no such file or folder")


def load(
    model: str | os.PathLike,
    device: str = "auto",
    threads: int | None = None,
    n_ctx: int | None = None,
    **backend_options: Any,
) -> Model:
    """Open a model and choose backend, device and threads for this machine.

    `device` is "auto", "cpu", "metal" or "cuda" (env POCKETLM_DEVICE); `threads` defaults
    to one per physical core (env POCKETLM_THREADS); `n_ctx` to the model's context, capped
    at 2048. `model.info.reasons` says why each choice was made.
    """
    path = Path(model).expanduser()
    fmt = detect_format(path)
    device = os.environ.get("POCKETLM_DEVICE", device) if device == "auto" else device
    if threads is None and os.environ.get("POCKETLM_THREADS", "").isdigit():
        threads = int(os.environ["POCKETLM_THREADS"])
    choice = choose(fmt, detect_facts(), device, threads)
    from .backends.llama_cpp import LlamaCppModel

    return LlamaCppModel(
        path, n_gpu_layers=choice.n_gpu_layers, device=choice.device, threads=choice.threads,
        n_ctx=n_ctx, reasons=choice.reasons, **backend_options,
    )
