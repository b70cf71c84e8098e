"""The data the loader, the selection and the backends pass each other: a model on disk
(`ModelSource`), what the choice reads of it (`ModelFacts`) and of the machine
(`PlatformFacts`), and the choice (`Choice`). A leaf: it imports nothing from pocketlm, so
the backend registry and every loading module can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
HF = "hf"  # a Hugging Face checkpoint folder: the input format, converted before it runs


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


@dataclass
class ModelSource:
    """A model on disk, as its headers and metadata describe it."""

    path: Path
    format: str  # a backend's format (gguf, ct2, ...) or "hf"
    architecture: str
    quant: str | None
    size_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)  # the format's own: GGUF keys, pocketlm.json, config.json
    header: Any = None  # the parsed header, when the format has one (GGUF)

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts(self.format, self.architecture, self.quant, self.size_bytes)
