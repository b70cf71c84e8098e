"""`load()`: open anything PocketLM can run and decide how to run it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from convert.errors import ModelLoadError, PocketLMError

from .model import Model
from .platform import ENCODER_DECODER, ModelFacts, choose, detect_facts

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def _is_ct2(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "shared_vocabulary.json").is_file()


def _model_file(path: Path) -> Path:
    """A folder holding exactly one GGUF (PocketLM's conversion cache) stands for that file."""
    if path.is_dir() and not _is_ct2(path):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1 and not (path / "config.json").is_file():
            return ggufs[0]
    return path


def detect_format(path: Path) -> str:
    """'gguf' (a file whose header and tensor table check out), 'ct2' (a CTranslate2 folder)
    or 'hf' (a Hugging Face checkpoint folder); anything else is explained in the error."""
    if path.is_file():
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic); is it a model file?")
        from convert.gguf_file import read_header

        read_header(path)  # refuses truncated/corrupt files before llama.cpp sees them
        return "gguf"
    if path.is_dir():
        if _is_ct2(path):
            return "ct2"
        if (path / "config.json").is_file():
            return "hf"
        raise ModelLoadError(f"{path}: this folder holds no model PocketLM can run")
    raise ModelLoadError(f"{path}: no such file or folder")


def inspect_model(path: Path, quant: str | None = None) -> ModelFacts:
    """What a model path is, known from headers and metadata alone."""
    fmt = detect_format(path)
    if fmt == "gguf":
        from convert.gguf_file import read_header
        from convert.gguf_target import FILE_TYPE_NAMES

        meta = read_header(path).metadata
        arch = str(meta.get("general.architecture", "unknown"))
        q = meta.get("pocketlm.quant") or FILE_TYPE_NAMES.get(meta.get("general.file_type", -1), "unknown")
        return ModelFacts("gguf", arch, q, path.stat().st_size)
    if fmt == "ct2":
        from .backends.ctranslate2 import read_folder_metadata

        meta = read_folder_metadata(path)
        return ModelFacts("ct2", meta.get("architecture", "t5"), meta.get("quant"), (path / "model.bin").stat().st_size)
    from convert.architectures import resolve
    from convert.checkpoint import read_json

    arch = resolve(read_json(path / "config.json"), str(path / "config.json"))
    size = sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    return ModelFacts("hf", arch.name, quant, size)


def resolve_path(model: str | os.PathLike, quant: str | None = None, progress: bool | None = None) -> Path:
    """A local path for `model`: itself, or what a hub id (org/name[@revision]) pulls."""
    path = Path(model).expanduser()
    if not path.exists():
        from .hub import parse_ref, pull

        ref = parse_ref(str(model))
        if ref is not None:
            path = pull(ref, quant=quant, progress=sys.stderr.isatty() if progress is None else progress)
    return _model_file(path)


def load(
    model: str | os.PathLike,
    device: str = "auto",
    threads: int | None = None,
    n_ctx: int | None = None,
    backend: str | None = None,
    quant: str | None = None,
    compute_type: str | None = None,
    progress: bool | None = None,
    **backend_options: Any,
) -> Model:
    """Open a model and choose backend, device and threads for this machine.

    `model` is a GGUF file, a CTranslate2 folder, a Hugging Face checkpoint folder (converted
    on first use into PocketLM's cache, with `quant` or the format's default, then reused), or
    a Hub id `org/name[@revision]` (downloaded once; for repos of GGUF files, `quant` picks one).
    `device` is "auto", "cpu", "metal" or "cuda" (env POCKETLM_DEVICE); `backend` "auto",
    "llama.cpp" or "ctranslate2" (env POCKETLM_BACKEND); `threads` defaults to one per physical
    core (env POCKETLM_THREADS); `n_ctx` to the model's context, capped at 2048 (GGUF) or 1024
    input tokens (CTranslate2); CTranslate2's `compute_type` is chosen for the machine unless
    given (env POCKETLM_COMPUTE_TYPE). `model.info.reasons` says why each choice was made.
    """
    env = os.environ
    if threads is None and env.get("POCKETLM_THREADS", "").strip():
        if not env["POCKETLM_THREADS"].strip().isdigit():
            raise PocketLMError(f"POCKETLM_THREADS={env['POCKETLM_THREADS']!r}: not a number of threads")
        threads = int(env["POCKETLM_THREADS"])
    if threads is not None and threads < 1:
        raise PocketLMError(f"threads={threads}: needs at least 1 thread")
    if n_ctx is not None and n_ctx < 1:
        raise PocketLMError(f"n_ctx={n_ctx}: the context must hold at least 1 token")
    path = resolve_path(model, quant, progress)
    facts = inspect_model(path, quant)
    if device == "auto":
        device = env.get("POCKETLM_DEVICE", device)
    backend = backend or env.get("POCKETLM_BACKEND")
    compute_type = compute_type or env.get("POCKETLM_COMPUTE_TYPE")
    choice = choose(facts, detect_facts(), backend, device, threads)
    for warning in choice.warnings:
        log.warning(warning)
    if facts.format == "hf":
        from .cache import converted

        path = converted(path, choice.format, choice.quant or "", progress=sys.stderr.isatty() if progress is None else progress)
    reasons = choice.reasons + [f"warning: {w}" for w in choice.warnings]
    if choice.format == "ct2":
        from .backends.ctranslate2 import CT2Seq2SeqModel

        if compute_type:
            reasons.append(f"compute {compute_type} (given)")
        return CT2Seq2SeqModel(
            path, device=choice.device, threads=choice.threads, compute_type=compute_type or choice.compute_type or "default",
            n_ctx=n_ctx, reasons=reasons, **backend_options,
        )
    if facts.architecture in ENCODER_DECODER:
        from .backends.llama_seq2seq import LlamaSeq2SeqModel as GGUFModel
    else:
        from .backends.llama_cpp import LlamaCppModel as GGUFModel
    return GGUFModel(
        path, n_gpu_layers=choice.n_gpu_layers, device=choice.device, threads=choice.threads,
        n_ctx=n_ctx, reasons=reasons, **backend_options,
    )


def describe_choice(path: Path, device: str = "auto", threads: int | None = None, backend: str | None = None) -> dict[str, Any]:
    """What `load()` would decide for a local path on this machine, without loading anything."""
    facts = inspect_model(path)
    choice = choose(facts, detect_facts(), backend, device, threads)
    return {
        "backend": choice.backend, "device": choice.device, "threads": choice.threads,
        "format": choice.format, "quant": choice.quant, "compute_type": choice.compute_type,
        "reasons": choice.reasons, "warnings": choice.warnings,
    }
