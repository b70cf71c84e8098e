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
    """'gguf' for a GGUF file whose header and tensor table check out, 'ct2' for a
    CTranslate2 model folder; anything else is explained in the error."""
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic); is it a model file?")
        read_header(path)  # refuses truncated/corrupt files before llama.cpp sees them
        return "gguf"
    if path.is_dir():
        if (path / "model.bin").is_file() and (path / "shared_vocabulary.json").is_file():
            return "ct2"
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
    at 2048 (GGUF) or 1024 input tokens (CTranslate2). CTranslate2 models also take
    `compute_type` (env POCKETLM_COMPUTE_TYPE). `model.info.reasons` says why each choice
    was made.
    """
    path = Path(model).expanduser()
    fmt = detect_format(path)
    device = os.environ.get("POCKETLM_DEVICE", device) if device == "auto" else device
    if threads is None and os.environ.get("POCKETLM_THREADS", "").isdigit():
        threads = int(os.environ["POCKETLM_THREADS"])
    if fmt == "ct2":
        from .backends.ctranslate2 import CT2Seq2SeqModel, read_folder_metadata

        choice = choose(fmt, detect_facts(), device, threads, quant=read_folder_metadata(path).get("quant"))
        compute = backend_options.pop("compute_type", None) or os.environ.get("POCKETLM_COMPUTE_TYPE")
        if compute:
            choice.reasons.append(f"compute {compute} (given)")
        return CT2Seq2SeqModel(
            path, device=choice.device, threads=choice.threads, compute_type=compute or choice.compute_type or "default",
            n_ctx=n_ctx, reasons=choice.reasons, **backend_options,
        )
    choice = choose(fmt, detect_facts(), device, threads)
    from .backends.llama_cpp import LlamaCppModel

    return LlamaCppModel(
        path, n_gpu_layers=choice.n_gpu_layers, device=choice.device, threads=choice.threads,
        n_ctx=n_ctx, reasons=choice.reasons, **backend_options,
    )
