"""`convert()`: a Hugging Face checkpoint folder in, a runnable model file out."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import gguf

from . import __version__
from .architectures import resolve
from .checkpoint import Checkpoint, sha256_file, source_identity
from .errors import UnsupportedModelError
from .gguf_target import DEFAULT_QUANT, convert_gguf, describe_types, fallbacks, quant_type
from .output import ConversionSummary, atomic_output

log = logging.getLogger(__name__)

FORMAT_SUFFIX = {"gguf": ".gguf"}


def default_output(src: Path, fmt: str, quant: str) -> Path:
    return Path.cwd() / f"{src.resolve().name}-{quant}{FORMAT_SUFFIX.get(fmt, '')}"


def _gguf_metadata(ckpt: Checkpoint, quant: str, progress: bool) -> Any:
    """Provenance keys: where the model came from, which converter, which bytes."""
    repo, revision = source_identity(ckpt.folder, ckpt.config)
    files = ckpt.source_files()
    hashes = [sha256_file(f) for f in files]

    def add(w: gguf.GGUFWriter) -> None:
        w.add_name(repo.split("/")[-1] if repo else ckpt.folder.resolve().name)
        if repo:
            w.add_string(gguf.Keys.General.SOURCE_URL, f"https://huggingface.co/{repo}")
            w.add_string("pocketlm.source.repo", repo)
        if revision:
            w.add_string("pocketlm.source.revision", revision)
        w.add_string("pocketlm.converter", "pocketlm")
        w.add_string("pocketlm.converter_version", __version__)
        w.add_string("pocketlm.quant", quant)
        w.add_array("pocketlm.source.files", [f.name for f in files])
        w.add_array("pocketlm.source.sha256", hashes)

    return add


def convert(
    src: str | Path,
    output: str | Path | None = None,
    quant: str | None = None,
    format: str | None = None,
    force: bool = False,
    progress: bool = False,
    threads: int | None = None,
) -> ConversionSummary:
    """Convert the Hugging Face checkpoint folder `src` and return what was written.

    `format` defaults to the architecture's native target (GGUF for BLOOM); `quant` to the
    format's default (q4_k_m for GGUF). The output appears only once complete and verified.
    """
    started = time.perf_counter()
    src = Path(src)
    with Checkpoint(src) as ckpt:
        arch = resolve(ckpt.config, str(src / "config.json"))
        fmt = (format or arch.default_format).lower()
        if fmt not in arch.formats:
            raise UnsupportedModelError(
                f"{arch.name} models convert to {', '.join(arch.formats)}, not {fmt}"
            )
        quant_name = (quant or DEFAULT_QUANT).lower()
        qt = quant_type(quant_name)
        dest = Path(output) if output is not None else default_output(src, fmt, quant_name)
        plan = arch.formats[fmt](ckpt)  # validates every tensor before anything is written
        metadata = _gguf_metadata(ckpt, quant_name, progress)
        source_dtypes = {ckpt.info(s).dtype for t in plan.tensors for s in t.sources}
        with atomic_output(dest, force) as tmp:
            types = convert_gguf(
                plan, tmp, qt, metadata, ckpt.release, source_dtypes, progress, threads
            )
            size = tmp.stat().st_size
    return ConversionSummary(
        output=str(dest),
        format=fmt,
        quant=quant_name,
        architecture=arch.name,
        tensors=len(types),
        types=describe_types(types),
        size_bytes=size,
        seconds=time.perf_counter() - started,
        fallbacks=fallbacks(plan, types, qt),
        warnings=plan.warnings,
    )
