"""PocketLM converters: Hugging Face checkpoints to GGUF and CTranslate2.

    from pocketlm.converters import convert
    summary = convert("path/to/bloomz-560m", "bloomz-560m-q4_k_m.gguf", quant="q4_k_m")

Reads checkpoints with numpy only: torch and transformers are never imported. The heavy
modules load on first use, so importing this package (and the runtime) stays fast.
"""

from typing import Any

from .core import __version__
from .core.errors import PocketLMError

__all__ = ["convert", "ConversionSummary", "PocketLMError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "convert":
        from .api import convert

        return convert
    if name == "ConversionSummary":
        from .output import ConversionSummary

        return ConversionSummary
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
