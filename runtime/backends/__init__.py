"""The registry of backends: each module of this package may declare one engine PocketLM runs on.

A backend is one `Backend` subclass, registered with `@register`, that says everything the
rest of the runtime needs to know about its engine: its name and aliases, the formats it
runs and how it recognises them (reading a model's metadata once), what it finds on this
machine (`probe`), its part of the decision table as a pure function (`decide`), how it opens
a model, and what `info` and `doctor` say about it. `load()`, `choose()`, `pocketlm info`,
`pocketlm doctor` and the CLI's `--backend`/`--device` choices iterate over `backends()`, so
a new engine is one new file in this folder.

The registry imports only leaves (the data types of runtime/loading/facts.py, the converters'
core), so the loading modules that iterate over it are never imported back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pocketlm.converters.core.errors import ModelLoadError
from pocketlm.converters.core.plugins import import_modules
from pocketlm.loading.facts import Choice, ModelFacts, ModelSource, PlatformFacts

if TYPE_CHECKING:
    from pocketlm.core.engine import Engine


def package_version(package: str) -> str | None:
    """The installed version of a pip distribution (None when it is not installed)."""
    import importlib.metadata  # 35 ms: imported when a version is asked for, not with pocketlm

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class Backend(ABC):
    """One engine: what it runs, how it is chosen, how it opens a model."""

    name: ClassVar[str]  # as users write it: --backend, ModelInfo.backend
    aliases: ClassVar[tuple[str, ...]] = ()
    formats: ClassVar[tuple[str, ...]]  # the model formats it runs (gguf, ct2, ...)
    devices: ClassVar[tuple[str, ...]] = ("cpu",)  # what it can run on
    package: ClassVar[str]  # the pip distribution that provides the engine
    priority: ClassVar[int] = 100  # lower first, among backends of one format

    # -- models -----------------------------------------------------------------------------
    def inspect(self, path: Path) -> ModelSource | None:
        """The model at `path` if it is in one of this backend's formats (else None): format,
        architecture, quant and metadata, read once. Refuse a corrupt file here, clearly."""
        return None

    def describe(self, source: ModelSource) -> dict[str, Any]:
        """What `pocketlm info` shows about a model in this backend's format."""
        return {}

    @abstractmethod
    def open(self, source: ModelSource, choice: Choice, n_ctx: int | None, **options: Any) -> Engine:
        """Load the model as `choice` decided (device, threads, compute type, reasons): the
        engine a `Model` will hold (core/engine.py)."""

    # -- the machine ------------------------------------------------------------------------
    def probe(self) -> Any:
        """What this machine's engine offers (GPU support, compute types), or None when the
        engine is not installed. Called once per process; may import the engine."""
        return None

    @abstractmethod
    def decide(self, model: ModelFacts, facts: PlatformFacts, device: str, threads: int, reasons: list[str]) -> Choice:
        """How this engine would run `model` on the machine `facts` describes (a pure function:
        tested with invented machines). `device` is "auto" or one the user asked for; append
        the why of each decision to `reasons`; raise ModelLoadError for what cannot be done."""

    def serving_parallel(self, choice: Choice) -> int:
        """How many requests to decode together when serving, as chosen (`parallel="auto"`)."""
        return 1

    def kv_budget(self, source: ModelSource, parallel: int) -> tuple[int, int] | None:
        """(tokens, bytes) the KV cache of `parallel` sequences takes by default, when the
        backend manages one (None when the engine sizes it itself)."""
        return None

    def memory_needed(self, model: ModelFacts, choice: Choice) -> int:
        """Bytes of RAM the model takes once loaded as chosen."""
        return model.size_bytes

    def version(self) -> str | None:
        """The installed version of the engine's package (None when it is not installed)."""
        return package_version(self.package)

    def report(self, facts: Any) -> dict[str, Any]:
        """`pocketlm doctor`'s lines about this engine, from its probe."""
        return {}

    def advice(self, facts: PlatformFacts) -> list[str]:
        """What to install or change for a better choice here (pure, like `decide`)."""
        return []

    def __repr__(self) -> str:
        return f"<backend {self.name}: {', '.join(self.formats)}>"


B = TypeVar("B", bound=type[Backend])
_REGISTRY: dict[str, Backend] = {}
_discovered = False


def register(cls: B) -> B:
    """Class decorator: make a backend known (by its name and aliases)."""
    backend = cls()
    for name in (backend.name, *backend.aliases):
        taken = _REGISTRY.get(name.lower())
        if taken is not None and taken.name != backend.name:
            raise ValueError(f"backend name {name!r} is taken by {taken.name}")
    _REGISTRY[backend.name.lower()] = backend
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name.lower(), None)


def discover() -> None:
    """Import every module of this package once, so that each registers its backend."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import_modules(__name__, __path__)


def backends() -> list[Backend]:
    """Every registered backend, in order of priority."""
    discover()
    return sorted(_REGISTRY.values(), key=lambda b: (b.priority, b.name))


def backend_names() -> list[str]:
    return [b.name for b in backends()]


def get_backend(name: str) -> Backend:
    """The backend called `name` or one of its aliases, or an error listing the choices."""
    key = name.lower()
    for backend in backends():
        if key == backend.name.lower() or key in (a.lower() for a in backend.aliases):
            return backend
    raise ModelLoadError(f"unknown backend {name!r}; choose one of: auto, {', '.join(backend_names())}")


def runners(fmt: str) -> list[Backend]:
    """The backends that run models of format `fmt`, in order of priority."""
    return [b for b in backends() if fmt in b.formats]


def devices() -> list[str]:
    """Every device some backend can use ("auto" first)."""
    known = ["cpu", "metal", "cuda"]
    seen = {d for backend in backends() for d in backend.devices}
    return ["auto", *[d for d in known if d in seen or d == "cpu"], *sorted(seen - set(known))]
