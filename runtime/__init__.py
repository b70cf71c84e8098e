"""PocketLM runtime: one API over llama.cpp (GGUF) for instruction-tuned models, offline.

    import runtime
    with runtime.load("bloomz-560m-q4_k_m.gguf") as model:
        print(model.generate("Translate to English: Je t'aime.").text)

Engines are imported only when a model is loaded; torch and transformers never are.
"""

from convert.core import __version__
from convert.core.errors import PocketLMError

from .generation import GenerationOptions, GenerationResult, StreamEvent, TokenStream
from .loader import load
from .model import Model, ModelInfo

__all__ = [
    "load",
    "Model",
    "ModelInfo",
    "GenerationOptions",
    "GenerationResult",
    "StreamEvent",
    "TokenStream",
    "PocketLMError",
    "__version__",
]
