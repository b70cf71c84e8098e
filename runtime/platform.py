"""Platform facts, and the pure function that decides how to run a model on them.

`choose()` takes no hidden inputs: everything it decides on is in `ModelFacts` and
`PlatformFacts`, so every branch is tested with invented machines (an Intel Mac with a
Metal build, a CUDA box whose llama.cpp has no CUDA, a 4 GB laptop...). `detect_facts()` is
the only part that looks at the real machine.

The decision table:
  format     machine                                  backend / device / compute
  GGUF       Apple Silicon + Metal build of llama.cpp llama.cpp, metal, all layers offloaded
  GGUF       CUDA build of llama.cpp                  llama.cpp, cuda, all layers offloaded
  GGUF       anything else                            llama.cpp, cpu
  CT2        CUDA device visible to CTranslate2       ctranslate2, cuda, int8_bfloat16/bfloat16
                                                      (T5 overflows in float16)
  CT2        CPU                                      ctranslate2, cpu, int8 for int8 models
                                                      (else float32), if the build supports it
  HF folder  BLOOM                                    converted to GGUF q4_k_m, then as GGUF
  HF folder  T5 family, Apple Silicon + Metal build   converted to GGUF q8_0 (Metal is llama.cpp only)
  HF folder  T5 family, CUDA visible to CTranslate2   converted to CT2 int8
  HF folder  T5 family, CPU                           converted to CT2 int8: llama.cpp's t5 graph
                                                      recomputes cross-attention per token and
                                                      decoded mt0-large at half CTranslate2's
                                                      speed (benchmarks/README.md)
Threads: one per physical core, never more than the CPUs this process may use.
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
BACKENDS = {"llama.cpp": "gguf", "ctranslate2": "ct2"}
BACKEND_ALIASES = {"llama.cpp": "llama.cpp", "llama": "llama.cpp", "llamacpp": "llama.cpp", "gguf": "llama.cpp",
                   "ctranslate2": "ctranslate2", "ct2": "ctranslate2"}
# Which formats each source architecture converts to.
CONVERSION_TARGETS = {"bloom": ("gguf",), "t5": ("ct2", "gguf")}
# Default quant per (architecture, format): BLOOMZ is memory-bound (q4_k_m); small T5s lose
# more to 4-bit rounding and gain less from it, so they keep 8 bits.
DEFAULT_QUANT = {("bloom", "gguf"): "q4_k_m", ("t5", "gguf"): "q8_0", ("t5", "ct2"): "int8"}
ENCODER_DECODER = {"t5"}
GIB = 2**30


@dataclass(frozen=True)
class PlatformFacts:
    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # x86_64, arm64, aarch64, AMD64
    physical_cores: int
    usable_cpus: int  # CPUs this process may run on (affinity, containers)
    ram_bytes: int | None
    cpu_features: frozenset[str] = frozenset()  # avx2, avx512f, neon...
    llama_gpu: str | None = None  # GPU backend compiled into llama.cpp: metal, cuda, ... or None
    ct2_cuda_devices: int = 0  # CUDA devices CTranslate2 can use
    ct2_cpu_compute: frozenset[str] = frozenset({"int8", "int8_float32", "float32"})  # its CPU build's types

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine in ("arm64", "aarch64")


@dataclass(frozen=True)
class ModelFacts:
    format: str  # gguf | ct2 | hf (a checkpoint folder, converted on first use)
    architecture: str  # bloom | t5 | ...
    quant: str | None = None
    size_bytes: int = 0


@dataclass
class Choice:
    backend: str
    device: str
    threads: int
    format: str  # what runs: gguf | ct2 (for an HF folder, what it is converted to)
    quant: str | None = None
    n_gpu_layers: int = 0
    compute_type: str | None = None
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def choose(
    model: ModelFacts,
    facts: PlatformFacts,
    backend: str | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> Choice:
    """How to run `model` on the machine `facts` describes, and why (user overrides win)."""
    device = (device or "auto").lower()
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    wanted = _backend_name(backend)
    fmt, quant = model.format, model.quant
    reasons: list[str] = []
    if fmt == "hf":
        fmt = _conversion_target(model.architecture, wanted, facts, reasons)
        quant = quant or DEFAULT_QUANT[(model.architecture, fmt)]
        reasons.append(f"convert the checkpoint to {fmt} {quant} on first use (cached)")
    elif wanted and BACKENDS[wanted] != fmt:
        raise ModelLoadError(f"backend {wanted} cannot run a {fmt} model (it runs {BACKENDS[wanted]})")
    n_threads = threads or max(1, min(facts.physical_cores, facts.usable_cpus))
    reasons.append(
        f"{n_threads} threads (given)" if threads
        else f"{n_threads} threads: one per physical core ({facts.physical_cores} physical, {facts.usable_cpus} usable CPUs)"
    )
    if fmt == "gguf":
        choice = _choose_llama(facts, device, n_threads, reasons)
    elif fmt == "ct2":
        choice = _choose_ct2(facts, device, n_threads, quant or "", model.size_bytes, reasons)
    else:
        raise ModelLoadError(f"no backend runs {fmt!r} models")
    choice.format, choice.quant = fmt, quant
    choice.warnings += _memory_warnings(model, choice, facts)
    return choice


def _backend_name(backend: str | None) -> str | None:
    if not backend or backend == "auto":
        return None
    try:
        return BACKEND_ALIASES[backend.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}") from None


def _conversion_target(architecture: str, backend: str | None, facts: PlatformFacts, reasons: list[str]) -> str:
    """The format a checkpoint is converted to: what its fastest engine here runs.

    Seq2seq models convert to both. Metal exists only in llama.cpp (GGUF). Elsewhere
    CTranslate2 wins: it caches the encoder's cross-attention keys and values while llama.cpp's
    t5 graph recomputes them for every generated token, so with a 128-token input it decoded
    mt0-large at about twice llama.cpp's speed on CPU (flan-t5-small: even), and it batches
    (benchmarks/README.md)."""
    targets = CONVERSION_TARGETS.get(architecture)
    if not targets:
        raise ModelLoadError(f"no converter for architecture {architecture!r}")
    if backend:
        fmt = BACKENDS[backend]
        if fmt not in targets:
            raise ModelLoadError(f"{architecture} models cannot be converted for {backend} (only {', '.join(targets)})")
        return fmt
    if len(targets) == 1:
        return targets[0]
    if facts.llama_gpu == "metal" and facts.apple_silicon:
        reasons.append("seq2seq on Apple Silicon: GGUF, the only format with a Metal engine")
        return "gguf"
    if facts.ct2_cuda_devices:
        reasons.append("seq2seq with a CUDA device: CTranslate2")
        return "ct2"
    reasons.append("seq2seq on CPU: CTranslate2, which caches cross-attention and batches "
                   "(faster than llama.cpp's t5 graph in benchmarks/)")
    return "ct2"


def _choose_llama(facts: PlatformFacts, device: str, threads: int, reasons: list[str]) -> Choice:
    gpu = facts.llama_gpu
    if device == "auto":
        if gpu == "metal" and facts.apple_silicon:
            device = "metal"
            reasons.append("Apple Silicon with a Metal build of llama.cpp: all layers on the GPU")
        elif gpu == "metal":
            device = "cpu"
            reasons.append("llama.cpp has Metal but this Mac is not Apple Silicon: the CPU is faster")
        elif gpu == "cuda":
            device = "cuda"
            reasons.append("llama.cpp was built with CUDA: all layers on the GPU")
        else:
            device = "cpu"
            if facts.apple_silicon:
                reasons.append("this llama.cpp build has no Metal: CPU (a Metal build would use the GPU)")
            elif facts.ct2_cuda_devices:
                reasons.append("a CUDA GPU is present (CTranslate2 sees it) but this llama.cpp build has no CUDA: CPU")
            else:
                reasons.append("no GPU backend in this llama.cpp build: CPU")
    elif device != "cpu":
        if gpu != device:
            flag = "GGML_METAL" if device == "metal" else "GGML_CUDA"
            raise ModelLoadError(
                f"device {device!r} requested but this llama.cpp build has {gpu or 'no GPU'} support; reinstall it: "
                f"CMAKE_ARGS='-D{flag}=on' pip install --force-reinstall --no-cache-dir llama-cpp-python"
            )
        reasons.append(f"device {device} (given)")
    else:
        reasons.append("device cpu (given)")
    return Choice("llama.cpp", device, threads, "gguf", n_gpu_layers=-1 if device != "cpu" else 0, reasons=reasons)


def _choose_ct2(facts: PlatformFacts, device: str, threads: int, quant: str, size: int, reasons: list[str]) -> Choice:
    if device == "metal":
        raise ModelLoadError("CTranslate2 has no Metal backend; convert the model to GGUF to use the Mac's GPU")
    if device == "cuda" and not facts.ct2_cuda_devices:
        raise ModelLoadError("device 'cuda' requested but CTranslate2 sees no CUDA device (pip install ctranslate2 "
                             "ships CUDA support; check the NVIDIA driver and CUDA 12 libraries)")
    if device == "auto":
        device = "cuda" if facts.ct2_cuda_devices else "cpu"
        reasons.append(f"CTranslate2 sees {facts.ct2_cuda_devices} CUDA device(s): {device}")
    else:
        reasons.append(f"device {device} (given)")
    int8 = quant.startswith("int8")
    if device == "cuda":  # T5 overflows in float16 on GPU (a known CTranslate2 issue)
        compute = "int8_bfloat16" if int8 else "bfloat16"
        reasons.append(f"compute {compute}: T5 activations overflow float16")
        return Choice("ctranslate2", device, threads, "ct2", compute_type=compute, reasons=reasons)
    wanted = "int8" if int8 else "int16" if quant == "int16" else "float32"
    compute = wanted if wanted in facts.ct2_cpu_compute else "float32"
    note = f" ({wanted} is not supported by this CPU build)" if compute != wanted else ""
    if compute == "int8" and facts.machine in ("x86_64", "AMD64") and facts.cpu_features and "avx2" not in facts.cpu_features:
        note = " (this CPU lacks AVX2: int8 kernels are slow, but keep 4x less memory)"
    reasons.append(f"compute {compute} on CPU for a {quant or 'unknown'} model{note}")
    return Choice("ctranslate2", device, threads, "ct2", compute_type=compute, reasons=reasons)


def _memory_warnings(model: ModelFacts, choice: Choice, facts: PlatformFacts) -> list[str]:
    if not facts.ram_bytes or not model.size_bytes or choice.device != "cpu":
        return []
    needed = model.size_bytes
    if choice.format == "ct2" and choice.compute_type == "float32" and (choice.quant or "").startswith(("int8", "int16", "float16", "bfloat16")):
        needed *= 4 if (choice.quant or "").startswith("int8") else 2  # weights expand to float32 in memory
    if model.format == "hf" and choice.quant == "q4_k_m":
        needed //= 3  # what the converted file will roughly need
    if needed > 0.75 * facts.ram_bytes:
        return [f"the model needs about {needed / GIB:.1f} GiB and this machine has {facts.ram_bytes / GIB:.1f} GiB "
                "of RAM: expect swapping; a smaller quant type (e.g. q4_k_m or int8) would fit better"]
    return []


# -- the real machine ---------------------------------------------------------------------

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


def _cpu_features() -> frozenset[str]:
    wanted = {"avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c", "neon", "asimd", "sve"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(set(line.split(":", 1)[1].split()) & wanted)
    except OSError:
        pass
    return frozenset({"neon"}) if _platform.machine() in ("arm64", "aarch64") else frozenset()


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
    """Facts about this machine and the installed engines (each engine is loaded to ask it)."""
    from convert import engine

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpu = None
    try:
        llama = engine.llama_cpp()
        info = llama.llama_print_system_info().decode("utf-8", "replace")
        gpu = llama_gpu_backend(info, bool(llama.llama_supports_gpu_offload()))
    except ModelLoadError:
        pass
    cuda, cpu_compute = 0, frozenset({"float32"})
    try:
        ct2 = engine.ctranslate2()
        cuda = int(ct2.get_cuda_device_count())
        cpu_compute = frozenset(ct2.get_supported_compute_types("cpu"))
    except (ModelLoadError, RuntimeError):
        pass
    return PlatformFacts(
        system=_platform.system(), machine=_platform.machine(), physical_cores=_physical_cores(),
        usable_cpus=usable, ram_bytes=_ram_bytes(), cpu_features=_cpu_features(), llama_gpu=gpu,
        ct2_cuda_devices=cuda, ct2_cpu_compute=cpu_compute,
    )
