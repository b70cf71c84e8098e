"""What the converters and the runtime share, and the only part of `convert` the runtime reads
besides `convert()` and the architecture registry: errors, engine loading, the version, the
output formats and their quant types, and readers of model files (GGUF headers, CTranslate2
folders, SentencePiece models). Nothing here imports a converter's writer or the runtime.
"""

__version__ = "0.1.0"
