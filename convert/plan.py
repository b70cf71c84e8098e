"""Plans: what an architecture module makes of a checkpoint, and what a format's writer consumes.

A plan is metadata plus an ordered list of output tensors, each knowing how to load its data
lazily. Writers (`gguf_target.py`, `ct2_target.py`) know nothing about the source model;
architecture modules (`architectures/<name>.py`) know nothing about file layouts. The
helpers below check a checkpoint against its config with messages that name the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import Bf16Array, Checkpoint
from .core.checks import count, epsilon
from .core.errors import CheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    import gguf


@dataclass
class TensorPlan:
    """One output tensor: its name, its numpy-order shape, and how to produce its data."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray | Bf16Array]
    sources: tuple[str, ...] = ()
    scale: float | None = None  # applied per row block, for heads that need folding

    @property
    def is_matrix(self) -> bool:
        """Matrices get the requested type; vectors (norms, biases) stay float32."""
        return len(self.shape) >= 2


@dataclass
class GGUFPlan:
    arch: str
    set_parameters: Callable[[gguf.GGUFWriter], None]
    tensors: list[TensorPlan]
    has_tokenizer: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class CT2Plan:
    spec: Any  # a ctranslate2.specs ModelSpec whose weights are TensorPlans
    vocabulary: list[str]
    config: dict[str, Any]  # written over the spec's config.json defaults
    files: dict[str, Path | bytes]  # extra files of the model folder (tokenizer): a file to copy, or the bytes
    runtime: dict[str, Any]  # what PocketLM's runtime needs, stored in pocketlm.json
    warnings: list[str] = field(default_factory=list)


def config_int(config: dict[str, Any], where: str, *keys: str, default: int | None = None) -> int:
    """The first present integer config value among `keys` (aliases across HF versions)."""
    for key in keys:
        value = config.get(key)
        if value is not None:
            if type(value) is not int or not 0 <= value < 2**40:
                raise UnsupportedModelError(f"{where}: config value {key}={value!r} is not a count")
            return value
    if default is None:
        raise UnsupportedModelError(f"{where}: config.json lacks {keys[0]}")
    return default


def config_float(config: dict[str, Any], where: str, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UnsupportedModelError(f"{where}: config value {key}={value!r} is not a non-negative number")
    return float(value)


def config_context(config: dict[str, Any], where: str, *keys: str, default: int) -> int:
    """A trained context length: a count llama.cpp holds (1 to INT32_MAX, core/checks.py)."""
    value = config_int(config, where, *keys, default=default)
    return count(where, next((k for k in keys if config.get(k) is not None), keys[0]), value, UnsupportedModelError)


def config_epsilon(config: dict[str, Any], where: str, key: str, default: float) -> float:
    """A normalisation epsilon: finite and above 0, as the GGUF loader requires (core/checks.py)."""
    return epsilon(where, key, config.get(key, default), UnsupportedModelError)


def expect(ckpt: Checkpoint, name: str, shape: Iterable[int]) -> None:
    """Fail with a clear message unless the checkpoint has `name` with exactly `shape`."""
    shape = tuple(shape)
    info = ckpt.info(name)
    if info.shape != shape:
        raise CheckpointError(
            f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(shape)} from config.json"
        )


def check_all_used(ckpt: Checkpoint, used: set[str], ignorable: Callable[[str], bool]) -> None:
    """An unmapped tensor is an error naming it, never silently dropped."""
    extra = [n for n in ckpt.names() if n not in used and not ignorable(n)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UnsupportedModelError(
            f"{ckpt.info(extra[0]).file}: tensor {extra[0]} is not part of a supported "
            f"{ckpt.config.get('model_type', '')} model{more}"
        )
