"""Platform facts, and the pure function that decides how to run a model on them.

`choose()` takes no hidden inputs: everything it decides on is in `ModelFacts` and
`PlatformFacts`, so every branch is tested with invented machines (an Intel Mac with a
Metal build, a CUDA box whose llama.cpp has no CUDA, a 4 GB laptop...). `detect_facts()` is
the only part that looks at the real machine; each backend probes its own engine.

The decision: a model file runs on the first backend that runs its format (or the one
asked for), which decides device and compute from the facts (its module's docstring has its
table: runtime/backends/llama_cpp.py, runtime/backends/ctranslate2.py). A checkpoint folder
is converted first, to the format its architecture lists first (convert/architectures/),
unless another of its formats runs on a GPU here and that one does not:
  BLOOM                                   GGUF q4_k_m, then as GGUF
  T5 family, CPU                          CTranslate2 int8: it caches cross-attention and
                                          batches; llama.cpp's t5 graph decoded mt0-large at
                                          half its speed (benchmarks/README.md)
  T5 family, CUDA visible to CTranslate2  CTranslate2 int8 on the GPU
  T5 family, Apple Silicon + Metal build  GGUF q8_0 (Metal is llama.cpp only)
Threads: one per physical core, never more than the CPUs this process may use.
"""

from __future__ import annotations

import functools
import os
import platform as _platform
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pocketlm.converters.core.errors import ModelLoadError

GIB = 2**30


@dataclass(frozen=True)
class PlatformFacts:
    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # x86_64, arm64, aarch64, AMD64
    physical_cores: int
    usable_cpus: int  # CPUs this process may run on (affinity, containers)
    ram_bytes: int | None
    cpu_features: frozenset[str] = frozenset()  # avx2, avx512f, neon...
    nvidia_gpu: bool = False  # an NVIDIA driver is installed (whether or not an engine uses it)
    engines: Mapping[str, Any] = field(default_factory=dict)  # backend name -> its probe (None: not installed)

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine in ("arm64", "aarch64")

    def engine(self, backend: str) -> Any:
        """What the backend's probe found (None when its engine is not installed)."""
        return self.engines.get(backend)


@dataclass(frozen=True)
class ModelFacts:
    format: str  # a backend's format (gguf, ct2, ...) or hf (a checkpoint folder, converted on first use)
    architecture: str  # bloom | t5 | ...
    quant: str | None = None
    size_bytes: int = 0


@dataclass
class Choice:
    backend: str
    device: str
    threads: int
    format: str  # what runs (for a checkpoint folder: what it is converted to)
    quant: str | None = None
    n_gpu_layers: int = 0
    compute_type: str | None = None
    parallel: int = 1  # sequences decoded together
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
    from pocketlm.backends import devices, get_backend, runners

    device = (device or "auto").lower()
    if device not in devices():
        raise ModelLoadError(f"unknown device {device!r}; choose one of: {', '.join(devices())}")
    wanted = get_backend(backend) if backend and backend.lower() != "auto" else None
    n_threads = threads or max(1, min(facts.physical_cores, facts.usable_cpus))
    threads_reason = (
        f"{n_threads} threads (given)"
        if threads
        else f"{n_threads} threads: one per physical core "
        f"({facts.physical_cores} physical, {facts.usable_cpus} usable CPUs)"
    )
    if model.format == "hf":
        return _converted(model, facts, wanted, device, n_threads, threads_reason)
    able = runners(model.format)
    if wanted is not None and wanted not in able:
        raise ModelLoadError(
            f"backend {wanted.name} cannot run a {model.format} model (it runs {', '.join(wanted.formats)})"
        )
    if not able:
        raise ModelLoadError(f"no backend runs {model.format!r} models")
    engine = wanted or able[0]
    reasons = [threads_reason]
    choice = engine.decide(model, facts, device, n_threads, reasons)
    choice.format, choice.quant = model.format, model.quant
    choice.warnings += _memory_warnings(model, choice, facts, engine.memory_needed(model, choice))
    return choice


def _converted(
    model: ModelFacts, facts: PlatformFacts, wanted: Any, device: str, threads: int, threads_reason: str
) -> Choice:
    """The conversion of a checkpoint folder to run, and how to run it.

    Each format the architecture converts to is asked of the backends that run it; a GPU
    beats the CPU, else the architecture's order of formats decides (the first is its best
    on CPU, for the reason its registry entry gives)."""
    from pocketlm.backends import runners
    from pocketlm.converters.architectures import get as get_architecture
    from pocketlm.converters.core.errors import PocketLMError
    from pocketlm.converters.core.formats import FORMATS

    arch = get_architecture(model.architecture)
    if arch is None:
        raise ModelLoadError(f"no converter for architecture {model.architecture!r}")
    options = [(fmt, b) for fmt in arch.targets for b in runners(fmt) if wanted is None or b is wanted]
    if not options:
        raise ModelLoadError(
            f"{arch.name} models cannot be converted for {wanted.name} (only {', '.join(arch.targets)})"
        )
    if model.quant:  # a quant type names its format: q4_k_m is GGUF, int8 CTranslate2
        fitting = [(fmt, b) for fmt, b in options if model.quant.lower() in FORMATS[fmt].quants]
        options = fitting or options
    decided: list[tuple[str, Any, str, Choice]] = []
    failure: PocketLMError | None = None
    for fmt, engine in options:
        quant = arch.quant(fmt, model.quant)
        try:
            choice = engine.decide(ModelFacts(fmt, arch.name, quant, model.size_bytes), facts, device, threads, [])
        except ModelLoadError as e:
            failure = failure or e
            continue
        decided.append((fmt, engine, quant, choice))
    if not decided:
        assert failure is not None
        raise failure
    on_gpu = [d for d in decided if d[3].device != "cpu"]
    fmt, engine, quant, choice = (on_gpu or decided)[0]
    reasons = []
    if len(arch.targets) > 1 and wanted is None:
        kind = "seq2seq" if arch.encoder_decoder else arch.name
        where = f"on {choice.device}" if choice.device != "cpu" else "on CPU"
        reasons.append(f"{kind} {where}: {FORMATS[fmt].title}, {arch.targets[fmt].why}")
    reasons.append(f"convert the checkpoint to {fmt} {quant} on first use (cached)")
    choice.reasons = [*reasons, threads_reason, *choice.reasons]
    choice.format, choice.quant = fmt, quant
    converted = ModelFacts(fmt, arch.name, quant, _converted_size(model.size_bytes, quant))
    choice.warnings += _memory_warnings(converted, choice, facts, engine.memory_needed(converted, choice))
    return choice


def _converted_size(size: int, quant: str) -> int:
    """Roughly what a checkpoint's conversion will weigh (checkpoints are usually 16- or 32-bit)."""
    return size // 3 if quant == "q4_k_m" else size


def _memory_warnings(model: ModelFacts, choice: Choice, facts: PlatformFacts, needed: int) -> list[str]:
    if not facts.ram_bytes or not needed or choice.device != "cpu":
        return []
    if needed > 0.75 * facts.ram_bytes:
        return [
            f"the model needs about {needed / GIB:.1f} GiB and this machine has {facts.ram_bytes / GIB:.1f} GiB "
            "of RAM: expect swapping; a smaller quant type (e.g. q4_k_m or int8) would fit better"
        ]
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


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_ram_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """RAM that can be allocated without swapping: Linux's MemAvailable, else the RAM's size."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return ram_bytes()


def _nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")


@functools.lru_cache(maxsize=1)
def detect_facts() -> PlatformFacts:
    """Facts about this machine and the installed engines (each backend probes its own)."""
    from pocketlm.backends import backends

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return PlatformFacts(
        system=_platform.system(),
        machine=_platform.machine(),
        physical_cores=_physical_cores(),
        usable_cpus=usable,
        ram_bytes=ram_bytes(),
        cpu_features=_cpu_features(),
        nvidia_gpu=_nvidia_gpu(),
        engines={b.name: b.probe() for b in backends()},
    )
