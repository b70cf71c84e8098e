"""PocketLM runtime: one API over llama.cpp (GGUF) for instruction-tuned models, offline.

    import runtime
    with runtime.load("bloomz-560m-q4_k_m.gguf") as model:
        print(model.generate("Translate to English: Je t'aime.").text)

Engines are imported only when a model is loaded; torch and transformers never are.
"""

from convert import __version__
from convert.errors import PocketLMError

from .loader import load
from .model import GenerationResult, Model, ModelInfo, StreamEvent

__all__ = ["load", "Model", "ModelInfo", "GenerationResult", "StreamEvent", "PocketLMError", "__version__"]
