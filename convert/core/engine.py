"""The engines, imported on first use: llama.cpp (its C logging tamed) and CTranslate2.

llama.cpp prints a page of log lines for every model load and quantization. Here they go to
Python logging at DEBUG (visible with `pocketlm -v`) and the last lines are kept, so an
engine failure can be reported with the engine's own reason instead of a wall of text.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from .errors import ModelLoadError, PocketLMError

log = logging.getLogger("pocketlm.llama_cpp")

_recent: collections.deque[str] = collections.deque(maxlen=40)
_state: dict[str, Any] = {}


def llama_cpp() -> Any:
    """The `llama_cpp` module, initialised, or a clear error naming the pip command."""
    module = _state.get("module")
    if module is not None:
        return module
    try:
        import llama_cpp as module
    except ImportError as e:
        raise ModelLoadError(
            f"llama.cpp engine unavailable ({e}); install it with: pip install llama-cpp-python"
        ) from None

    @module.llama_log_callback
    def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", "replace").rstrip("\n")
        if line:
            _recent.append(line)
            log.debug(line)

    module.llama_log_set(_on_log, ctypes.c_void_p(0))
    module.llama_backend_init()
    _state["callback"] = _on_log  # keep a reference: C holds only the pointer
    _state["module"] = module
    return module


def extra_buffer_types() -> bool:
    """Whether llama.cpp may use its extra CPU weight layouts (repacking, AMX tiles).

    Off on CPUs that report AMX: llama.cpp then runs its AMX kernels, and where a hypervisor
    does not virtualise the AMX tile state they fault (seen here: SIGSEGV on `ldtilecfg` in
    `ggml_backend_amx_mul_mat`), killing the process. POCKETLM_LLAMA_AMX=1 turns them back on.
    """
    if os.environ.get("POCKETLM_LLAMA_AMX", "").strip() == "1":
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True
    return "amx_tile" not in flags.split()


def recent_log(n: int = 3) -> str:
    """The engine's last few log lines, for error messages."""
    lines = [line.strip() for line in list(_recent)[-n:] if line.strip()]
    return "; ".join(lines)


@contextlib.contextmanager
def quiet_c_output() -> Iterator[None]:
    """Capture what C code writes straight to stdout/stderr (bypassing the log callback)."""
    try:
        fds = (sys.stdout.fileno(), sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):  # no real fds (e.g. under a test runner)
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in fds:
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for fd, copy in zip(fds, saved):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    _recent.append(line)
                    log.debug(line)


class _Hidden:
    """A meta-path finder that makes some top-level packages look uninstalled."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by PocketLM)", name=name)
        return None


def ctranslate2(specs: bool = False) -> Any:
    """The `ctranslate2` module (with `ctranslate2.specs` loaded if asked).

    `ctranslate2.specs` imports torch when it can, only for conversions PocketLM does not
    use; torch is hidden while it loads, so PocketLM never imports torch.
    """
    try:
        import ctranslate2 as module
    except ImportError as e:
        raise ModelLoadError(
            f"CTranslate2 engine unavailable ({e}); install it with: pip install ctranslate2"
        ) from None
    if specs and "ctranslate2.specs" not in sys.modules:
        hidden = None if "torch" in sys.modules else _Hidden({"torch"})
        if hidden:
            sys.meta_path.insert(0, hidden)
        try:
            import ctranslate2.specs  # noqa: F401
        except ImportError as e:
            raise PocketLMError(f"ctranslate2.specs could not be imported: {e}") from None
        finally:
            if hidden:
                sys.meta_path.remove(hidden)
    return module
