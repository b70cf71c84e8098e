"""The selection: how to run a model on a machine, as a pure function of their facts.

`choose()` takes no hidden inputs: everything it decides on is in `ModelFacts` and
`PlatformFacts` (runtime/loading/facts.py), so every branch is tested with invented machines
(an Intel Mac with a Metal build, a CUDA box whose llama.cpp has no CUDA, a 4 GB laptop...).
The real machine's facts come from `detect_facts()` (runtime/loading/machine.py).

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

from pocketlm.backends import Backend, devices, get_backend, runners
from pocketlm.converters.core.errors import ModelLoadError, PocketLMError
from pocketlm.loading.facts import GIB, HF, Choice, ModelFacts, PlatformFacts


def choose(
    model: ModelFacts,
    facts: PlatformFacts,
    backend: str | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> Choice:
    """How to run `model` on the machine `facts` describes, and why (user overrides win)."""
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
    if model.format == HF:
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
    model: ModelFacts, facts: PlatformFacts, wanted: Backend | None, device: str, threads: int, threads_reason: str
) -> Choice:
    """The conversion of a checkpoint folder to run, and how to run it.

    Each format the architecture converts to is asked of the backends that run it; a GPU
    beats the CPU, else the architecture's order of formats decides (the first is its best
    on CPU, for the reason its registry entry gives)."""
    from pocketlm.converters.architectures import get as get_architecture
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
    decided: list[tuple[str, Backend, str, Choice]] = []
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
