"""PocketLM: BLOOMZ and the T5 family (Flan-T5, mT0, T0) offline, on llama.cpp and CTranslate2.

    import pocketlm

    with pocketlm.load("bloomz-560m-q4_k_m.gguf") as model:
        print(model.generate("Translate to English: Je t'aime.").text)
    pocketlm.convert("path/to/flan-t5-small", "flan-t5-small-ct2")  # int8 CTranslate2

The package (this folder, runtime/ in the repository; docs/extending.md has the map):
  core/       the decode core: the Model facade, the engine contract, requests and their
              scheduler, samples and beams, the logits chain, text and tokenizers
  loading/    from a path or hub id to a running model: what a path holds, the machine, the
              choice of engine and device, the hub, the conversion cache, generation defaults
  backends/   one module per engine (llama.cpp, CTranslate2), each registered with what it runs
  serving/    the OpenAI-compatible server (request parsing, the service, HTTP), Ray
  cli/        the `pocketlm` command, doctor, info, the demo, JSONL batch jobs
  converters/ (convert/ in the repository) Hugging Face checkpoints to GGUF and CTranslate2

Names are imported on first use, so `import pocketlm` stays fast and engines load only with a
model; torch and transformers are never imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pocketlm.converters.core import __version__
from pocketlm.converters.core.errors import PocketLMError

if TYPE_CHECKING:
    from pocketlm.converters.api import convert
    from pocketlm.core.engine import Embeddings, ModelInfo
    from pocketlm.core.generation import GenerationOptions, GenerationResult, StreamEvent, TokenStream
    from pocketlm.core.model import Model
    from pocketlm.loading.load import load

_HOMES = {
    "load": "pocketlm.loading.load",
    "Model": "pocketlm.core.model",
    "ModelInfo": "pocketlm.core.engine",
    "Embeddings": "pocketlm.core.engine",
    "GenerationOptions": "pocketlm.core.generation",
    "GenerationResult": "pocketlm.core.generation",
    "StreamEvent": "pocketlm.core.generation",
    "TokenStream": "pocketlm.core.generation",
    "convert": "pocketlm.converters.api",
}

__all__ = [
    "load",
    "convert",
    "Model",
    "ModelInfo",
    "Embeddings",
    "GenerationOptions",
    "GenerationResult",
    "StreamEvent",
    "TokenStream",
    "PocketLMError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
