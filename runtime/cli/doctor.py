"""`pocketlm doctor`: what this machine and its engines offer, what PocketLM would pick for
each kind of model, and what to install for a better pick."""

from __future__ import annotations

from typing import Any

from pocketlm.backends import package_version
from pocketlm.loading.cache import cache_root
from pocketlm.loading.choose import choose
from pocketlm.loading.facts import GIB, ModelFacts, PlatformFacts
from pocketlm.loading.machine import detect_facts

LIBRARIES = ("gguf", "tokenizers", "numpy")  # what every backend's models need besides the engines


def samples() -> dict[str, ModelFacts]:
    """One model of each kind PocketLM converts to, and each kind of checkpoint folder."""
    from pocketlm.converters.architectures import architectures
    from pocketlm.converters.core.formats import FORMATS

    out = {}
    for arch in architectures():
        for fmt in arch.targets:
            quant = arch.quant(fmt)
            out[f"{arch.name} {FORMATS[fmt].title} ({quant})"] = ModelFacts(fmt, arch.name, quant)
        out[f"{arch.name} checkpoint folder"] = ModelFacts("hf", arch.name)
    return out


def recommendations(facts: PlatformFacts) -> list[str]:
    """Actionable advice from the facts (pure, so every branch is testable)."""
    from pocketlm.backends import backends

    tips = [tip for backend in backends() for tip in backend.advice(facts)]
    if facts.machine in ("x86_64", "AMD64") and facts.cpu_features and "avx2" not in facts.cpu_features:
        tips.append("this CPU lacks AVX2: quantized kernels run slowly; prefer small models")
    if facts.ram_bytes and facts.ram_bytes < 4 * GIB:
        tips.append(f"only {facts.ram_bytes / GIB:.1f} GiB of RAM: use q4_k_m (GGUF) or int8 (CTranslate2) models")
    return tips or ["nothing to improve: PocketLM uses the best engine and device available here"]


def doctor_report() -> dict[str, Any]:
    from pocketlm.backends import backends
    from pocketlm.converters.core.errors import PocketLMError

    facts = detect_facts()
    engines: dict[str, Any] = {b.package: b.version() for b in backends()}
    engines.update({name: package_version(name) for name in LIBRARIES})
    for backend in backends():
        engines.update(backend.report(facts.engine(backend.name)))
    choices: dict[str, Any] = {}
    for label, model in samples().items():
        try:
            c = choose(model, facts)
        except PocketLMError as e:
            choices[label] = {"error": str(e)}
            continue
        choices[label] = {
            "backend": c.backend,
            "device": c.device,
            "threads": c.threads,
            "compute_type": c.compute_type,
            "format": c.format,
            "quant": c.quant,
            "reasons": c.reasons,
        }
    return {
        "machine": {
            "system": facts.system,
            "machine": facts.machine,
            "physical_cores": facts.physical_cores,
            "usable_cpus": facts.usable_cpus,
            "ram_gib": round(facts.ram_bytes / GIB, 1) if facts.ram_bytes else None,
            "cpu_features": sorted(facts.cpu_features),
            "nvidia_gpu": facts.nvidia_gpu,
        },
        "engines": engines,
        "backends": {
            b.name: {
                "formats": list(b.formats),
                "devices": list(b.devices),
                "aliases": list(b.aliases),
                "installed": facts.engine(b.name) is not None,
            }
            for b in backends()
        },
        "cache": str(cache_root()),
        "would_choose": choices,
        "recommendations": recommendations(facts),
    }


def describe(report: dict[str, Any]) -> str:
    lines = ["machine"]
    lines += [f"  {k:<16}{v}" for k, v in report["machine"].items()]
    lines.append("engines")
    lines += [f"  {k:<30}{v if v is not None else 'not installed'}" for k, v in report["engines"].items()]
    lines.append("backends")
    for name, b in report["backends"].items():
        state = "" if b["installed"] else " (not installed)"
        lines.append(f"  {name:<14}runs {', '.join(b['formats'])} on {', '.join(b['devices'])}{state}")
    lines.append(f"cache           {report['cache']}")
    lines.append("would choose")
    for label, c in report["would_choose"].items():
        if "error" in c:
            lines.append(f"  {label}: cannot run here ({c['error']})")
            continue
        compute = f", compute {c['compute_type']}" if c["compute_type"] else ""
        lines.append(f"  {label}: {c['backend']} / {c['device']}, {c['threads']} threads{compute}")
    lines.append("recommendations")
    lines += [f"  - {tip}" for tip in report["recommendations"]]
    return "\n".join(lines)
