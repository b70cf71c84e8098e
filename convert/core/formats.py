"""The formats PocketLM writes and runs, and their quant types: one table for the converter,
the runtime, the CLI's help and `doctor`.

An architecture picks its own default quant per format (`convert/architectures/`); the
defaults here apply when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from .errors import PocketLMError, UnsupportedModelError

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclass(frozen=True)
class QuantType:
    """A GGUF quant type. `direct`: the one tensor type of an unmixed type (no importance matrix
    applies); the others are llama.cpp's mixes (convert/quant_mix.py). PocketLM writes every
    type tensor by tensor while streaming, as llama-quantize would write it."""

    name: str
    file_type: FT
    direct: Q | None = None

    @property
    def block(self) -> int:
        """Row length the main tensor type needs; narrower rows fall back."""
        if self.direct is not None:
            return gguf.GGML_QUANT_SIZES[self.direct][0]
        return 256 if "_K" in self.file_type.name else 32


GGUF_QUANTS: dict[str, QuantType] = {
    q.name: q
    for q in (
        QuantType("f32", FT.ALL_F32, Q.F32),
        QuantType("f16", FT.MOSTLY_F16, Q.F16),
        QuantType("bf16", FT.MOSTLY_BF16, Q.BF16),
        QuantType("q8_0", FT.MOSTLY_Q8_0, Q.Q8_0),
        QuantType("q4_0", FT.MOSTLY_Q4_0),
        QuantType("q4_1", FT.MOSTLY_Q4_1),
        QuantType("q5_0", FT.MOSTLY_Q5_0),
        QuantType("q5_1", FT.MOSTLY_Q5_1),
        QuantType("q2_k", FT.MOSTLY_Q2_K),
        QuantType("q3_k_s", FT.MOSTLY_Q3_K_S),
        QuantType("q3_k_m", FT.MOSTLY_Q3_K_M),
        QuantType("q3_k_l", FT.MOSTLY_Q3_K_L),
        QuantType("q4_k_s", FT.MOSTLY_Q4_K_S),
        QuantType("q4_k_m", FT.MOSTLY_Q4_K_M),
        QuantType("q5_k_s", FT.MOSTLY_Q5_K_S),
        QuantType("q5_k_m", FT.MOSTLY_Q5_K_M),
        QuantType("q6_k", FT.MOSTLY_Q6_K),
    )
}
GGUF_FILE_TYPES = {int(q.file_type): q.name for q in GGUF_QUANTS.values()}  # general.file_type -> name
CT2_QUANTS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Format:
    """An output format: its name, what users may call it, its quant types."""

    name: str
    title: str
    aliases: tuple[str, ...]
    quants: tuple[str, ...]
    default_quant: str
    quant_help: str  # how the quant types differ, for --help
    extension: str  # of the output: ".gguf" for a file, "" for a folder
    tag: str = ""  # in default output names, before the quant

    def output_name(self, stem: str, quant: str | None = None) -> str:
        """The name of an output: `<stem>[-tag][-quant]<extension>`."""
        return f"{stem}{self.tag}{f'-{quant}' if quant else ''}{self.extension}"

    def quant(self, name: str | None, default: str | None = None) -> str:
        """A quant type of this format (lower-cased), or an error listing the choices."""
        quant = (name or default or self.default_quant).lower()
        if quant not in self.quants:
            raise UnsupportedModelError(
                f"unknown {self.title} quant type {quant!r}; choose one of: {', '.join(self.quants)}"
            )
        return quant


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "gguf",
            "GGUF",
            ("gguf",),
            tuple(GGUF_QUANTS),
            "q4_k_m",
            "every type is written tensor by tensor while streaming, as llama-quantize would write it",
            ".gguf",
        ),
        Format(
            "ct2",
            "CTranslate2",
            ("ct2", "ctranslate2"),
            CT2_QUANTS,
            "int8",
            "int8 types quantize the matrices (per row), the suffix is the type of the rest",
            "",
            "-ct2",
        ),
    )
}


def get_format(name: str) -> Format:
    """The format called `name` (or one of its aliases), or an error listing the formats."""
    key = name.lower()
    for fmt in FORMATS.values():
        if key in fmt.aliases:
            return fmt
    raise UnsupportedModelError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}")


def gguf_quant_type(name: str) -> QuantType:
    return GGUF_QUANTS[FORMATS["gguf"].quant(name)]


# Types one tensor may be given (llama.cpp's quantizer: output_tensor_type), e.g. the output head.
TENSOR_TYPES: dict[str, Q] = {
    "f32": Q.F32,
    "f16": Q.F16,
    "bf16": Q.BF16,
    "q8_0": Q.Q8_0,
    "q6_k": Q.Q6_K,
    "q5_k": Q.Q5_K,
    "q5_0": Q.Q5_0,
    "q4_k": Q.Q4_K,
    "q4_0": Q.Q4_0,
    "q3_k": Q.Q3_K,
    "q2_k": Q.Q2_K,
}


def tensor_type(name: str) -> Q:
    """A tensor type by name (as `--output-type` takes it)."""
    try:
        return TENSOR_TYPES[name.lower()]
    except KeyError:
        raise PocketLMError(f"unknown tensor type {name!r} (choose from {', '.join(TENSOR_TYPES)})") from None


def gguf_quant_name(metadata: dict) -> str:
    """The quant type of a GGUF file, from PocketLM's own key or llama.cpp's file type."""
    named = metadata.get("pocketlm.quant")
    if named:
        return str(named)
    file_type = metadata.get("general.file_type")
    return GGUF_FILE_TYPES.get(file_type, "unknown") if isinstance(file_type, int) else "unknown"
