"""`pocketlm doctor`: what this machine and its engines offer, what PocketLM would pick for
each kind of model, and what to install for a better pick."""

from __future__ import annotations

import importlib.metadata
import shutil
from typing import Any

from .cache import cache_root
from .platform import GIB, ModelFacts, PlatformFacts, choose, detect_facts

SAMPLES = {
    "BLOOMZ GGUF (q4_k_m)": ModelFacts("gguf", "bloom", "q4_k_m"),
    "T5-family CTranslate2 (int8)": ModelFacts("ct2", "t5", "int8"),
    "BLOOMZ checkpoint folder": ModelFacts("hf", "bloom"),
    "T5-family checkpoint folder": ModelFacts("hf", "t5"),
}
REINSTALL = "CMAKE_ARGS='-D{flag}=on' pip install --force-reinstall --no-cache-dir llama-cpp-python"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def recommendations(facts: PlatformFacts, engines: dict[str, str | None], nvidia_gpu: bool) -> list[str]:
    """Actionable advice from the facts (pure, so every branch is testable)."""
    tips = []
    if not engines.get("llama-cpp-python"):
        tips.append("llama.cpp is missing (GGUF models cannot run): pip install llama-cpp-python")
    if not engines.get("ctranslate2"):
        tips.append("CTranslate2 is missing (T5-family models cannot run): pip install ctranslate2")
    if facts.apple_silicon and facts.llama_gpu != "metal" and engines.get("llama-cpp-python"):
        tips.append("this Mac's GPU is unused: rebuild llama.cpp with Metal: " + REINSTALL.format(flag="GGML_METAL"))
    if nvidia_gpu and facts.llama_gpu != "cuda" and engines.get("llama-cpp-python"):
        tips.append("an NVIDIA GPU is present but llama.cpp runs on CPU: " + REINSTALL.format(flag="GGML_CUDA"))
    if nvidia_gpu and not facts.ct2_cuda_devices and engines.get("ctranslate2"):
        tips.append("an NVIDIA GPU is present but CTranslate2 sees none: install the NVIDIA driver and CUDA 12 "
                    "libraries (pip install nvidia-cublas-cu12 nvidia-cudnn-cu12)")
    if facts.machine in ("x86_64", "AMD64") and facts.cpu_features and "avx2" not in facts.cpu_features:
        tips.append("this CPU lacks AVX2: quantized kernels run slowly; prefer small models")
    if facts.ram_bytes and facts.ram_bytes < 4 * GIB:
        tips.append(f"only {facts.ram_bytes / GIB:.1f} GiB of RAM: use q4_k_m (GGUF) or int8 (CTranslate2) models")
    return tips or ["nothing to improve: PocketLM uses the best engine and device available here"]


def doctor_report() -> dict[str, Any]:
    facts = detect_facts()
    engines = {name: _version(name) for name in ("llama-cpp-python", "ctranslate2", "gguf", "tokenizers", "numpy")}
    nvidia = shutil.which("nvidia-smi") is not None
    choices = {}
    for label, model in SAMPLES.items():
        c = choose(model, facts)
        choices[label] = {"backend": c.backend, "device": c.device, "threads": c.threads,
                          "compute_type": c.compute_type, "format": c.format, "quant": c.quant, "reasons": c.reasons}
    return {
        "machine": {
            "system": facts.system, "machine": facts.machine, "physical_cores": facts.physical_cores,
            "usable_cpus": facts.usable_cpus, "ram_gib": round(facts.ram_bytes / GIB, 1) if facts.ram_bytes else None,
            "cpu_features": sorted(facts.cpu_features), "nvidia_gpu": nvidia,
        },
        "engines": {
            **engines, "llama.cpp GPU backend": facts.llama_gpu or "none (CPU only)",
            "ctranslate2 CUDA devices": facts.ct2_cuda_devices,
            "ctranslate2 CPU compute types": sorted(facts.ct2_cpu_compute),
        },
        "cache": str(cache_root()),
        "would_choose": choices,
        "recommendations": recommendations(facts, engines, nvidia),
    }


def describe(report: dict[str, Any]) -> str:
    lines = ["machine"]
    lines += [f"  {k:<16}{v}" for k, v in report["machine"].items()]
    lines.append("engines")
    lines += [f"  {k:<30}{v if v is not None else 'not installed'}" for k, v in report["engines"].items()]
    lines.append(f"cache           {report['cache']}")
    lines.append("would choose")
    for label, c in report["would_choose"].items():
        compute = f", compute {c['compute_type']}" if c["compute_type"] else ""
        lines.append(f"  {label}: {c['backend']} / {c['device']}, {c['threads']} threads{compute}")
    lines.append("recommendations")
    lines += [f"  - {tip}" for tip in report["recommendations"]]
    return "\n".join(lines)
