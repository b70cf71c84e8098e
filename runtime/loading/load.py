"""`load()`: open anything PocketLM can run and decide how to run it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from pocketlm.converters.core.errors import PocketLMError
from pocketlm.core.model import Model
from pocketlm.loading.choose import choose
from pocketlm.loading.defaults import model_generation_defaults
from pocketlm.loading.facts import HF, Choice, ModelSource
from pocketlm.loading.machine import detect_facts
from pocketlm.loading.source import inspect

log = logging.getLogger(__name__)


def resolve_path(model: str | os.PathLike, quant: str | None = None, progress: bool | None = None) -> Path:
    """A local path for `model`: itself, or what a hub id (org/name[@revision]) pulls."""
    path = Path(model).expanduser()
    if not path.exists():
        from pocketlm.loading.hub import parse_ref, pull

        ref = parse_ref(str(model))
        if ref is not None:
            path = pull(ref, quant=quant, progress=sys.stderr.isatty() if progress is None else progress)
    return path


def load(
    model: str | os.PathLike,
    device: str = "auto",
    threads: int | None = None,
    n_ctx: int | None = None,
    backend: str | None = None,
    quant: str | None = None,
    compute_type: str | None = None,
    progress: bool | None = None,
    parallel: int | str | None = None,
    **backend_options: Any,
) -> Model:
    """Open a model and choose backend, device and threads for this machine.

    `model` is a GGUF file, a CTranslate2 folder, a Hugging Face checkpoint folder (converted
    on first use into PocketLM's cache, with `quant` or the architecture's default, then
    reused), or a Hub id `org/name[@revision]` (downloaded once; for repos of GGUF files,
    `quant` picks one). `device` is "auto", "cpu", "metal" or "cuda" (env POCKETLM_DEVICE);
    `backend` "auto" or a backend's name (`pocketlm doctor` lists them; env POCKETLM_BACKEND);
    `threads` defaults to one per physical core (env POCKETLM_THREADS); `n_ctx` to the model's
    context, capped at 2048 (causal GGUF) or 1024 tokens (seq2seq); CTranslate2's
    `compute_type` is chosen for the machine unless given (env POCKETLM_COMPUTE_TYPE).
    `parallel` sequences are decoded together (default 1; "auto": the backend's choice for
    serving): generate() of a list and concurrent callers (`pocketlm serve --parallel`) share
    engine steps, through `model.scheduler`.
    `model.info.reasons` says why each choice was made.
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
    if parallel is not None and parallel != "auto" and (not isinstance(parallel, int) or parallel < 1):
        raise PocketLMError(f"parallel={parallel!r}: needs at least 1 sequence, or 'auto'")
    source = inspect(resolve_path(model, quant, progress), quant)
    if device == "auto":
        device = env.get("POCKETLM_DEVICE", device)
    choice = decide(source, device, threads, backend or env.get("POCKETLM_BACKEND"))
    for warning in choice.warnings:
        log.warning(warning)
    compute_type = compute_type or env.get("POCKETLM_COMPUTE_TYPE")
    if compute_type and choice.compute_type is not None:  # the backend has compute types
        choice.compute_type = compute_type
        choice.reasons.append(f"compute {compute_type} (given)")
    from pocketlm.backends import get_backend

    backend_unit = get_backend(choice.backend)
    if parallel == "auto":
        choice.parallel = backend_unit.serving_parallel(choice)
        choice.reasons.append(f"{choice.parallel} sequences decoded together (auto for {choice.device})")
    elif parallel is not None:
        choice.parallel = parallel
        choice.reasons.append(f"{parallel} sequences decoded together (given)")
    choice.reasons += [f"warning: {w}" for w in choice.warnings]
    checkpoint = source.path if source.format == HF else None
    if source.format == HF:
        from pocketlm.loading.cache import converted

        path = converted(
            source.path,
            choice.format,
            choice.quant or "",
            progress=sys.stderr.isatty() if progress is None else progress,
        )
        source = inspect(path)
    engine = backend_unit.open(source, choice, n_ctx, **backend_options)
    defaults = model_generation_defaults(source, checkpoint)  # generation_config.json, kept by the converter
    if defaults is not None:
        for warning in defaults.warnings:
            log.warning(warning)
    return Model(engine, defaults.options if defaults is not None else None)


def decide(source: ModelSource, device: str = "auto", threads: int | None = None, backend: str | None = None) -> Choice:
    """What `load()` decides for a model on this machine, without loading anything."""
    return choose(source.facts, detect_facts(), backend, device, threads)
