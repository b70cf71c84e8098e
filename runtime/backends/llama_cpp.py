"""The llama.cpp backend: GGUF files, causal (BLOOMZ) and encoder-decoder (T5 family).

Decision table (`decide`):
  Apple Silicon + Metal build of llama.cpp   metal, all layers offloaded
  Metal build on an Intel Mac                cpu (its GPU is slower than the CPU here)
  CUDA build of llama.cpp                    cuda, all layers offloaded
  anything else                              cpu (saying which build would use the GPU)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketlm.backends import Backend, register
from pocketlm.converters.architectures import get as get_architecture
from pocketlm.converters.core import engine
from pocketlm.converters.core.checks import check_gguf
from pocketlm.converters.core.errors import ModelLoadError
from pocketlm.converters.core.formats import gguf_quant_name
from pocketlm.converters.core.gguf_file import IMATRIX_KEYS, IMATRIX_SUFFIX, MAGIC
from pocketlm.converters.core.gguf_split import read_model_header, split_files
from pocketlm.loading.facts import Choice, ModelFacts, ModelSource, PlatformFacts

REINSTALL = "CMAKE_ARGS='-D{flag}=on' pip install --force-reinstall --no-cache-dir llama-cpp-python"


@dataclass(frozen=True)
class LlamaFacts:
    gpu: str | None = None  # the GPU backend compiled into llama.cpp: metal, cuda, ... or None


def gpu_backend(system_info: str, offload: bool) -> str | None:
    """The GPU backend named in llama.cpp's system info, if the build can offload at all."""
    if not offload:
        return None
    names = {m.lower() for m in re.findall(r"(\w+) :", system_info)}
    for backend, markers in (("metal", {"metal", "mtl"}), ("cuda", {"cuda"}), ("vulkan", {"vulkan"})):
        if names & markers:
            return backend
    return "gpu"


def _only_model(folder: Path) -> Path | None:
    """A file of the one GGUF model in `folder` (one file, or the files of one split), if it
    holds exactly one; importance matrices beside it do not count."""
    ggufs = [p for p in sorted(folder.glob("*.gguf")) if not p.name.endswith(IMATRIX_SUFFIX)]
    models = {split_files(p.name)[0]: p for p in reversed(ggufs)}  # a split's lowest-numbered file
    return next(iter(models.values())) if len(models) == 1 else None


@register
class LlamaCpp(Backend):
    name = "llama.cpp"
    aliases = ("llama", "llamacpp", "gguf")
    formats = ("gguf",)
    devices = ("cpu", "metal", "cuda")
    package = "llama-cpp-python"
    priority = 10

    # -- models -----------------------------------------------------------------------------
    def inspect(self, path: Path) -> ModelSource | None:
        if path.is_dir() and not (path / "config.json").is_file():
            # a folder of one GGUF model (a cache entry, a repo snapshot), maybe with its importance matrix
            path = _only_model(path) or path
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                return None
        # any file of a split model stands for all of them; refuses truncated/corrupt files and
        # missing or mismatched parts before llama.cpp sees them
        header = read_model_header(path)
        meta = header.metadata
        check_gguf(header, header.path)  # llama.cpp trusts its numbers: refuse what would abort or exhaust it
        return ModelSource(
            header.path,
            "gguf",
            header.architecture,
            gguf_quant_name(meta),
            header.size_bytes,
            metadata=meta,
            header=header,
        )

    def describe(self, source: ModelSource) -> dict[str, Any]:
        header = source.header
        meta = dict(header.metadata)
        meta.update({k: f"[{n} entries]" for k, n in header.array_lengths.items()})
        arch = header.architecture
        on_load = []  # what loading changes, also in the loaded model's info.reasons
        width = header.metadata.get(f"{arch}.embedding_length")
        if arch == "t5" and isinstance(width, int) and width > 0:
            from pocketlm.backends.llama_seq2seq import lacks_output_scale, output_scale_reason

            if lacks_output_scale(header, source.path):
                on_load.append(output_scale_reason(width**-0.5))
        return {
            "size_bytes": header.size_bytes,  # every file of a split model
            "files": [str(f) for f in header.files],
            "parameters": sum(math.prod(t.shape) for t in header.tensors),
            "tensors": len(header.tensors),
            "tensor_types": dict(Counter(t.type.name.lower() for t in header.tensors).most_common()),
            "context_length": meta.get(f"{arch}.context_length"),
            "tokenizer": meta.get("tokenizer.ggml.model", "none"),
            "converter": {"name": meta.get("pocketlm.converter"), "version": meta.get("pocketlm.converter_version")},
            "source": {
                "repo": meta.get("pocketlm.source.repo"),
                "revision": meta.get("pocketlm.source.revision"),
                "files": dict(zip(meta.get("pocketlm.source.files", []), meta.get("pocketlm.source.sha256", []))),
            },
            "metadata": meta,
            "on_load": on_load,
            "imatrix": {k: meta.get(key) for k, key in IMATRIX_KEYS.items()} if IMATRIX_KEYS["file"] in meta else None,
        }

    def open(self, source: ModelSource, choice: Choice, n_ctx: int | None, **options: Any) -> Any:
        arch = get_architecture(source.architecture)
        if arch is not None and arch.encoder_decoder:
            from pocketlm.backends.llama_seq2seq import LlamaSeq2SeqEngine as GGUFEngine
        else:
            from pocketlm.backends.llama_causal import LlamaCausalEngine as GGUFEngine  # type: ignore[assignment]
        return GGUFEngine(
            source.path,
            n_gpu_layers=choice.n_gpu_layers,
            device=choice.device,
            threads=choice.threads,
            n_ctx=n_ctx,
            reasons=choice.reasons,
            n_seq=choice.parallel,
            header=source.header,
            **options,
        )

    # -- the machine ------------------------------------------------------------------------
    def probe(self) -> LlamaFacts | None:
        try:
            llama = engine.llama_cpp()
        except ModelLoadError:
            return None
        info = llama.llama_print_system_info().decode("utf-8", "replace")
        return LlamaFacts(gpu_backend(info, bool(llama.llama_supports_gpu_offload())))

    def decide(self, model: ModelFacts, facts: PlatformFacts, device: str, threads: int, reasons: list[str]) -> Choice:
        gpu = (facts.engine(self.name) or LlamaFacts()).gpu
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
                elif facts.nvidia_gpu:
                    reasons.append("an NVIDIA GPU is present but this llama.cpp build has no CUDA: CPU")
                else:
                    reasons.append("no GPU backend in this llama.cpp build: CPU")
        elif device != "cpu":
            if gpu != device:
                flag = "GGML_METAL" if device == "metal" else "GGML_CUDA"
                raise ModelLoadError(
                    f"device {device!r} requested but this llama.cpp build has {gpu or 'no GPU'} support; reinstall "
                    "it: " + REINSTALL.format(flag=flag)
                )
            reasons.append(f"device {device} (given)")
        else:
            reasons.append("device cpu (given)")
        return Choice(self.name, device, threads, "gguf", n_gpu_layers=-1 if device != "cpu" else 0, reasons=reasons)

    def serving_parallel(self, choice: Choice) -> int:
        # bloomz-560m q4_k_m, 2 CPU threads, 16 clients (benchmarks/README.md): 2.7x the aggregate
        # tokens/s of one sequence at a time with 16, 1.7x with 4, single-client latency unchanged
        return 16

    def kv_budget(self, source: ModelSource, parallel: int) -> tuple[int, int] | None:
        from pocketlm.backends.llama_causal import DEFAULT_MAX_CTX as CAUSAL_CTX
        from pocketlm.backends.llama_common import plan_context
        from pocketlm.backends.llama_seq2seq import DEFAULT_MAX_CTX as SEQ2SEQ_CTX

        registered = get_architecture(source.architecture)
        cap = SEQ2SEQ_CTX if registered is not None and registered.encoder_decoder else CAUSAL_CTX
        dims = check_gguf(source.header, source.path)
        # what LlamaSession will ask of llama.cpp, decided the same way
        plan = plan_context(
            source.path, dims, cap, n_seq=parallel, exact=source.quant == "f32", model_bytes=source.size_bytes
        )
        return plan.kv_cells, plan.kv_bytes

    def report(self, facts: LlamaFacts | None) -> dict[str, Any]:
        return {"llama.cpp GPU backend": (facts.gpu if facts else None) or "none (CPU only)"}

    def advice(self, facts: PlatformFacts) -> list[str]:
        if facts.engine(self.name) is None:
            return ["llama.cpp is missing (GGUF models cannot run): pip install llama-cpp-python"]
        gpu = (facts.engine(self.name) or LlamaFacts()).gpu
        tips = []
        if facts.apple_silicon and gpu != "metal":
            tips.append(
                "this Mac's GPU is unused: rebuild llama.cpp with Metal: " + REINSTALL.format(flag="GGML_METAL")
            )
        if facts.nvidia_gpu and gpu != "cuda":
            tips.append("an NVIDIA GPU is present but llama.cpp runs on CPU: " + REINSTALL.format(flag="GGML_CUDA"))
        return tips
