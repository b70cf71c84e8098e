"""`pocketlm info`: what a model file holds and how this machine would run it."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from convert.errors import ModelLoadError, PocketLMError
from convert.gguf_file import read_header

from .loader import describe_choice, detect_format, inspect_model, resolve_path


def _gguf_report(path: Path) -> dict[str, Any]:
    header = read_header(path)
    meta = dict(header.metadata)
    meta.update({k: f"[{n} entries]" for k, n in header.array_lengths.items()})
    arch = header.architecture
    types = Counter(t.type.name.lower() for t in header.tensors)
    params = sum(math.prod(t.shape) for t in header.tensors)
    source = {
        "repo": meta.get("pocketlm.source.repo"),
        "revision": meta.get("pocketlm.source.revision"),
        "files": dict(zip(meta.get("pocketlm.source.files", []), meta.get("pocketlm.source.sha256", []))),
    }
    return {
        "architecture": arch,
        "quant": meta.get("pocketlm.quant"),
        "parameters": params,
        "tensors": len(header.tensors),
        "tensor_types": dict(types.most_common()),
        "context_length": meta.get(f"{arch}.context_length"),
        "tokenizer": meta.get("tokenizer.ggml.model", "none"),
        "converter": {"name": meta.get("pocketlm.converter"), "version": meta.get("pocketlm.converter_version")},
        "source": source,
        "metadata": meta,
    }


def _ct2_report(folder: Path) -> dict[str, Any]:
    from convert.ct2_target import read_model_bin

    from .backends.ctranslate2 import read_folder_metadata

    meta = read_folder_metadata(folder)
    try:
        variables, aliases = read_model_bin(folder / "model.bin")
    except PocketLMError as e:
        raise ModelLoadError(str(e)) from None
    types = Counter(dtype for dtype, _ in variables.values())
    source = meta.get("source") or {}
    return {
        "architecture": meta.get("architecture", "unknown"),
        "quant": meta.get("quant"),
        "parameters": sum(math.prod(shape) for name, (_, shape) in variables.items() if not name.endswith("_scale")),
        "tensors": len(variables),
        "tensor_types": dict(types.most_common()),
        "context_length": None,
        "tokenizer": meta.get("tokenizer") or "none",
        "converter": {"name": meta.get("converter"), "version": meta.get("converter_version")},
        "source": {"repo": source.get("repo"), "revision": source.get("revision"), "files": source.get("files", {})},
        "metadata": {**meta, "aliases": len(aliases)},
    }


def _hf_report(folder: Path) -> dict[str, Any]:
    from convert.checkpoint import read_json

    config = read_json(folder / "config.json")
    facts = inspect_model(folder)
    return {
        "architecture": facts.architecture, "quant": None, "parameters": None, "tensors": None,
        "tensor_types": {}, "context_length": None,
        "tokenizer": next((n for n in ("tokenizer.json", "spiece.model") if (folder / n).is_file()), "none"),
        "converter": {"name": None, "version": None}, "source": {"repo": None, "revision": None, "files": {}},
        "metadata": {"config": config},
    }


def model_report(model: str, device: str = "auto", threads: int | None = None, backend: str | None = None) -> dict[str, Any]:
    path = resolve_path(model)
    fmt = detect_format(path)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size
    report: dict[str, Any] = {"path": str(path), "format": fmt, "size_bytes": size}
    report.update({"gguf": _gguf_report, "ct2": _ct2_report, "hf": _hf_report}[fmt](path))
    report["would_run_on"] = describe_choice(path, device, threads, backend)
    return report


def describe(r: dict[str, Any]) -> str:
    run = r["would_run_on"]
    params = f", {r['parameters'] / 1e6:.1f}M parameters, {r['tensors']} tensors" if r["parameters"] else ""
    lines = [
        f"{r['path']}",
        f"  format        {r['format']} ({r['size_bytes'] / 2**20:.1f} MiB)",
        f"  architecture  {r['architecture']}{params}",
        f"  quant         {r['quant'] or '-'} ({', '.join(f'{n} {t}' for t, n in r['tensor_types'].items())})",
        f"  context       {r['context_length'] or 'not fixed (relative positions)'}",
        f"  tokenizer     {r['tokenizer']}",
    ]
    conv = r["converter"]
    if conv["name"]:
        lines.append(f"  converter     {conv['name']} {conv['version']}")
    src = r["source"]
    if src["repo"]:
        lines.append(f"  source        {src['repo']}" + (f"@{src['revision']}" if src["revision"] else ""))
    for name, digest in src["files"].items():
        lines.append(f"    sha256 {digest}  {name}")
    compute = f", compute {run['compute_type']}" if run.get("compute_type") else ""
    lines.append(f"  would run on  {run['backend']} / {run['device']}, {run['threads']} threads{compute}")
    lines += [f"    - {reason}" for reason in run["reasons"]]
    lines += [f"    ! {warning}" for warning in run["warnings"]]
    return "\n".join(lines)
