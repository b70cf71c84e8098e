"""The registry of source architectures: one module per architecture, found by itself.

Each module in this package registers an `Architecture`: the Hugging Face names it handles,
whether it is an encoder-decoder, and per output format the plan builder and the default
and allowed quant types. `convert()`, the runtime's choice of a conversion and the CLI's help
all read it here, so a new architecture is one new file in this folder (plus its parity test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import UnsupportedModelError
from ..core.formats import FORMATS, Format, get_format
from ..core.plugins import import_modules


@dataclass(frozen=True)
class Target:
    """How an architecture converts to one format."""

    plan: Callable[..., Any]  # Checkpoint -> the format's plan (validates every tensor)
    default_quant: str | None = None  # None: the format's default
    quants: tuple[str, ...] | None = None  # None: every quant type of the format
    why: str = ""  # why this format is preferred where several could run: said when it is chosen


@dataclass(frozen=True)
class Architecture:
    """A source architecture and the formats it converts to (the first is its default)."""

    name: str  # PocketLM's and llama.cpp's name (general.architecture)
    hf_architectures: tuple[str, ...]  # config.json "architectures" values
    targets: dict[str, Target]
    model_types: tuple[str, ...] = ()  # config.json model_type values, when architectures is absent
    encoder_decoder: bool = False
    family: str = ""  # the models it covers, for help texts
    # its models continue a prompt that does not end clearly (final punctuation) instead of
    # answering it: the runtime warns once
    needs_prompt_end: bool = False

    @property
    def default_format(self) -> str:
        return next(iter(self.targets))

    def target(self, fmt: str | None = None) -> tuple[Format, Target]:
        """The format (name or alias; default: the first) and how to convert to it."""
        found = get_format(fmt) if fmt else FORMATS[self.default_format]
        if found.name not in self.targets:
            raise UnsupportedModelError(f"{self.name} models convert to {', '.join(self.targets)}, not {fmt}")
        return found, self.targets[found.name]

    def quant(self, fmt: str | None = None, quant: str | None = None) -> str:
        """The quant type to convert to: `quant` checked, or this architecture's default."""
        found, target = self.target(fmt)
        name = found.quant(quant, target.default_quant)
        if target.quants is not None and name not in target.quants:
            raise UnsupportedModelError(
                f"{self.name} models convert to {found.title} as {', '.join(target.quants)}, not {name}"
            )
        return name


ARCHITECTURES: dict[str, Architecture] = {}  # by Hugging Face architecture name
_BY_NAME: dict[str, Architecture] = {}
_discovered = False


def register(arch: Architecture) -> Architecture:
    """Add an architecture (each module of this package calls it once, at import)."""
    for fmt in arch.targets:
        if fmt not in FORMATS:
            raise ValueError(f"architecture {arch.name}: unknown format {fmt!r}")
    _BY_NAME[arch.name] = arch
    for hf_name in arch.hf_architectures:
        ARCHITECTURES[hf_name] = arch
    return arch


def discover() -> None:
    """Import every architecture module of this package (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import_modules(__name__, __path__)


def architectures() -> list[Architecture]:
    """Every registered architecture, by name."""
    discover()
    return [_BY_NAME[n] for n in sorted(_BY_NAME)]


def get(name: str) -> Architecture | None:
    """The architecture PocketLM calls `name` (bloom, t5, ...), if registered."""
    discover()
    return _BY_NAME.get(name)


def resolve(config: dict[str, Any], where: str) -> Architecture:
    """The registered architecture for a config, or an error listing what is supported."""
    discover()
    names = config.get("architectures") or []
    names = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = config.get("model_type")
    for arch in _BY_NAME.values():
        if model_type in arch.model_types:
            return arch
    found = ", ".join(map(str, names)) or (f"model_type {model_type!r}" if model_type else "none")
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedModelError(f"{where}: unsupported architecture ({found}); supported: {supported}")
