"""PocketLM converters: Hugging Face checkpoints to GGUF (and, per architecture, CTranslate2).

    from convert import convert
    summary = convert("path/to/bloomz-560m", "bloomz-560m-q4_k_m.gguf", quant="q4_k_m")

Reads checkpoints with numpy only: torch and transformers are never imported.
"""

__version__ = "0.1.0"

from . import bloom, t5  # noqa: E402,F401  (register the architectures)
from .api import convert  # noqa: E402
from .errors import PocketLMError  # noqa: E402
from .output import ConversionSummary  # noqa: E402

__all__ = ["convert", "ConversionSummary", "PocketLMError", "__version__"]
