"""`pocketlm info`: what a model file holds and how this machine would run it."""

from __future__ import annotations

import json
from typing import Any

from pocketlm.loading.defaults import model_generation_defaults
from pocketlm.loading.facts import HF, ModelSource
from pocketlm.loading.load import decide, resolve_path
from pocketlm.loading.source import inspect


def _checkpoint_report(source: ModelSource) -> dict[str, Any]:
    folder = source.path
    return {
        "parameters": None,
        "tensors": None,
        "tensor_types": {},
        "context_length": None,
        "tokenizer": next((n for n in ("tokenizer.json", "spiece.model") if (folder / n).is_file()), "none"),
        "converter": {"name": None, "version": None},
        "source": {"repo": None, "revision": None, "files": {}},
        "metadata": {"config": source.metadata},
    }


def model_report(
    model: str, device: str = "auto", threads: int | None = None, backend: str | None = None
) -> dict[str, Any]:
    """Everything `pocketlm info` shows: what the model holds (its headers, read once) and how
    this machine would run it."""
    from pocketlm.backends import runners

    source = inspect(resolve_path(model))
    path = source.path
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size
    report: dict[str, Any] = {
        "path": str(path),
        "format": source.format,
        "size_bytes": size,
        "architecture": source.architecture,
        "quant": source.quant if source.format != HF else None,
    }
    if source.format == HF:
        report.update(_checkpoint_report(source))
    else:
        report.update(runners(source.format)[0].describe(source))
    defaults = model_generation_defaults(source)
    report["generation"] = defaults.to_dict() if defaults is not None else None
    choice = decide(source, device, threads, backend)
    from pocketlm.backends import get_backend

    unit = get_backend(choice.backend)
    serving = unit.serving_parallel(choice)
    kv = unit.kv_budget(source, serving) if source.format != HF else None
    report["would_run_on"] = {
        "serving_parallel": serving,
        "serving_kv_cells": kv[0] if kv else None,
        "serving_kv_bytes": kv[1] if kv else None,
        "backend": choice.backend,
        "device": choice.device,
        "threads": choice.threads,
        "format": choice.format,
        "quant": choice.quant,
        "compute_type": choice.compute_type,
        "reasons": [*choice.reasons, *report.get("on_load", [])],
        "warnings": choice.warnings,
    }
    return report


def describe(r: dict[str, Any]) -> str:
    run = r["would_run_on"]
    params = f", {r['parameters'] / 1e6:.1f}M parameters, {r['tensors']} tensors" if r["parameters"] else ""
    lines = [
        f"{r['path']}",
        f"  format        {r['format']} ({r['size_bytes'] / 2**20:.1f} MiB{_in_files(r)})",
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
    imatrix = r.get("imatrix")
    if imatrix:  # what llama.cpp's quantizer was guided by
        lines.append(f"  imatrix       {imatrix['file']} ({imatrix['chunks']} chunks, {imatrix['entries']} matrices)")
    generation = r.get("generation")
    if generation and (generation["defaults"] or generation["not_applied"] or generation["warnings"]):
        shown = ", ".join(f"{k} {v}" for k, v in generation["defaults"].items()) or "none PocketLM applies"
        lines.append(f"  generation    {shown} (from {generation['source']}; overridable)")
        if generation["not_applied"]:
            why = {"max_length": " (counts the prompt)", "min_length": " (counts the prompt)"}
            shown = ", ".join(f"{k} {json.dumps(v)}{why.get(k, '')}" for k, v in generation["not_applied"].items())
            lines.append(f"    not applied: {shown}")
        lines += [f"    ! {warning}" for warning in generation["warnings"]]
    compute = f", compute {run['compute_type']}" if run.get("compute_type") else ""
    lines.append(f"  would run on  {run['backend']} / {run['device']}, {run['threads']} threads{compute}")
    lines += [f"    - {reason}" for reason in run["reasons"]]
    lines += [f"    ! {warning}" for warning in run["warnings"]]
    kv = ""
    if run.get("serving_kv_cells"):
        size = f", about {run['serving_kv_bytes'] / 2**20:.0f} MiB" if run.get("serving_kv_bytes") else ""
        kv = f", KV cache {run['serving_kv_cells']} tokens{size}"
    lines.append(
        f"  serving       {run['serving_parallel']} requests decoded together{kv} (pocketlm serve --parallel auto)"
    )
    return "\n".join(lines)


def _in_files(report: dict[str, Any]) -> str:
    """The size line's " in N files" for a split GGUF."""
    files = report.get("files") or []
    return f" in {len(files)} files" if len(files) > 1 else ""
