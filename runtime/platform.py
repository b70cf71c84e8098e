"""Platform facts, and the pure function that picks backend, device and threads from them.

`choose()` takes no hidden inputs: everything it decides on is in `PlatformFacts`, so every
branch is tested with invented machines (an Intel Mac with a Metal build, a CUDA box...).
`detect_facts()` is the only part that looks at the real machine.
"""

from __future__ import annotations

import functools
import os
import platform as _platform
import re
import subprocess
from dataclasses import dataclass, field

from convert.errors import ModelLoadError

DEVICES = ("auto", "cpu", "metal", "cuda")


@dataclass(frozen=True)
class PlatformFacts:
    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # x86_64, arm64, aarch64, AMD64
    physical_cores: int
    usable_cpus: int  # CPUs this process may run on (affinity, containers)
    ram_bytes: int | None
    llama_gpu: str | None = None  # GPU backend compiled into llama.cpp: metal, cuda, ... or None
    ct2_cuda_devices: int = 0  # CUDA devices CTranslate2 can use
    ct2_cpu_compute: frozenset[str] = frozenset({"int8", "int8_float32", "float32"})  # what its CPU build computes


@dataclass
class Choice:
    backend: str
    device: str
    threads: int
    n_gpu_layers: int = 0
    compute_type: str | None = None
    reasons: list[str] = field(default_factory=list)


def choose(
    model_format: str, facts: PlatformFacts, device: str = "auto", threads: int | None = None, quant: str | None = None,
) -> Choice:
    """Backend, device, threads (and compute type) for a model on a machine, with the reasons."""
    device = (device or "auto").lower()
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    n_threads = threads or max(1, min(facts.physical_cores, facts.usable_cpus))
    reasons = [
        f"{n_threads} threads (given)" if threads
        else f"{n_threads} threads: one per physical core ({facts.physical_cores} physical, "
        f"{facts.usable_cpus} usable CPUs)"
    ]
    if model_format == "gguf":
        return _choose_llama(facts, device, n_threads, reasons)
    if model_format == "ct2":
        return _choose_ct2(facts, device, n_threads, quant or "", reasons)
    raise ModelLoadError(f"no backend runs {model_format!r} models")


def _choose_ct2(facts: PlatformFacts, device: str, threads: int, quant: str, reasons: list[str]) -> Choice:
    if device == "metal":
        raise ModelLoadError("CTranslate2 has no Metal backend; convert the model to GGUF to use the Mac's GPU")
    if device == "cuda" and not facts.ct2_cuda_devices:
        raise ModelLoadError("device 'cuda' requested but CTranslate2 sees no CUDA device")
    if device == "auto":
        device = "cuda" if facts.ct2_cuda_devices else "cpu"
        reasons.append(f"CTranslate2 sees {facts.ct2_cuda_devices} CUDA device(s): {device}")
    else:
        reasons.append(f"device {device} (given)")
    int8 = quant.startswith("int8")
    if device == "cuda":  # T5 overflows in float16 on GPU (a known CTranslate2 issue): bfloat16
        compute = "int8_bfloat16" if int8 else "bfloat16"
        reasons.append(f"compute {compute}: T5 activations overflow float16")
    else:
        wanted = "int8" if int8 else "int16" if quant == "int16" else "float32"
        compute = wanted if wanted in facts.ct2_cpu_compute else "float32"
        reasons.append(
            f"compute {compute} on CPU for a {quant or 'unknown'} model"
            + (f" ({wanted} is not supported by this CPU build)" if compute != wanted else "")
        )
    return Choice("ctranslate2", device, threads, 0, compute, reasons)


def _choose_llama(facts: PlatformFacts, device: str, n_threads: int, reasons: list[str]) -> Choice:
    gpu = facts.llama_gpu
    apple_silicon = facts.system == "Darwin" and facts.machine in ("arm64", "aarch64")
    if device == "auto":
        if gpu == "metal" and apple_silicon:
            device = "metal"
            reasons.append("Apple Silicon with a Metal build of llama.cpp: all layers on the GPU")
        elif gpu == "metal":
            device = "cpu"
            reasons.append("llama.cpp has Metal but this Mac is not Apple Silicon: CPU is faster")
        elif gpu == "cuda":
            device = "cuda"
            reasons.append("llama.cpp was built with CUDA: all layers on the GPU")
        else:
            device = "cpu"
            reasons.append("llama.cpp build has no GPU backend: CPU"
                           + (" (a Metal build would use the GPU)" if apple_silicon else ""))
    elif device != "cpu":
        if gpu != device:
            raise ModelLoadError(
                f"device {device!r} requested but this llama.cpp build has "
                f"{gpu or 'no GPU'} support; reinstall llama-cpp-python with "
                + ("CMAKE_ARGS='-DGGML_METAL=on'" if device == "metal" else "CMAKE_ARGS='-DGGML_CUDA=on'")
                + " pip install --force-reinstall --no-cache-dir llama-cpp-python"
            )
        reasons.append(f"device {device} (given)")
    else:
        reasons.append("device cpu (given)")
    return Choice("llama.cpp", device, n_threads, -1 if device != "cpu" else 0, None, reasons)


def _physical_cores() -> int:
    logical = os.cpu_count() or 1
    system = _platform.system()
    try:
        if system == "Linux":
            cores = set()
            phys = core = None
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("physical id"):
                        phys = line.split(":")[1].strip()
                    elif line.startswith("core id"):
                        core = line.split(":")[1].strip()
                    elif not line.strip():
                        if core is not None:
                            cores.add((phys, core))
                        phys = core = None
            if core is not None:
                cores.add((phys, core))
            return len(cores) or logical
        if system == "Darwin":
            for key in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
                if out.returncode == 0 and out.stdout.strip().isdigit():
                    return int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return logical


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def llama_gpu_backend(system_info: str, offload: bool) -> str | None:
    """The GPU backend named in llama.cpp's system info, if the build can offload at all."""
    if not offload:
        return None
    names = {m.lower() for m in re.findall(r"(\w+) :", system_info)}
    for backend, markers in (("metal", {"metal", "mtl"}), ("cuda", {"cuda"}), ("vulkan", {"vulkan"})):
        if names & markers:
            return backend
    return "gpu"


@functools.lru_cache(maxsize=1)
def detect_facts() -> PlatformFacts:
    """Facts about this machine and the installed engines (llama.cpp is loaded to ask it)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpu = None
    try:
        from convert import engine

        llama = engine.llama_cpp()
        gpu = llama_gpu_backend(
            llama.llama_print_system_info().decode("utf-8", "replace"), bool(llama.llama_supports_gpu_offload())
        )
    except ModelLoadError:
        pass
    cuda, cpu_compute = 0, frozenset({"float32"})
    try:
        from convert import engine

        ct2 = engine.ctranslate2()
        cuda = int(ct2.get_cuda_device_count())
        cpu_compute = frozenset(ct2.get_supported_compute_types("cpu"))
    except (ModelLoadError, RuntimeError):
        pass
    return PlatformFacts(
        system=_platform.system(), machine=_platform.machine(), physical_cores=_physical_cores(),
        usable_cpus=usable, ram_bytes=_ram_bytes(), llama_gpu=gpu, ct2_cuda_devices=cuda,
        ct2_cpu_compute=cpu_compute,
    )
