"""The tensor type llama.cpp's quantizer gives each tensor, for every GGUF file type PocketLM writes.

A file type (`q4_k_m`, `q3_k_s`, ...) is a mix: `llama_model_quantize` gives most matrices the
type's main tensor type, some more bits (by role: attention values, feed-forward outputs,
the output head; and by position in the model), keeps some tensors as they are (vectors,
norms, T5's relative position bias), and replaces a type whose block does not divide the
row length. This module states those choices, as read in the llama.cpp source that
llama-cpp-python 0.3.36 bundles (src/llama-quant.cpp: `llama_tensor_get_type` and the
functions it calls), so that PocketLM's direct writer produces the file llama-quantize
would; tests/test_direct_quant.py checks the bytes against llama_model_quantize.

Scope: dense models (no experts) and the file types of `core.formats.GGUF_QUANTS`; the
i-quant, ternary and MXFP4 mixes are not stated here and are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import gguf

from .core.errors import PocketLMError, UnsupportedModelError

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# A file type's main tensor type (llama_ftype_get_default_type).
MAIN_TYPE: dict[FT, Q] = {
    FT.ALL_F32: Q.F32,
    FT.MOSTLY_F16: Q.F16,
    FT.MOSTLY_BF16: Q.BF16,
    FT.MOSTLY_Q8_0: Q.Q8_0,
    FT.MOSTLY_Q4_0: Q.Q4_0,
    FT.MOSTLY_Q4_1: Q.Q4_1,
    FT.MOSTLY_Q5_0: Q.Q5_0,
    FT.MOSTLY_Q5_1: Q.Q5_1,
    FT.MOSTLY_Q2_K: Q.Q2_K,
    FT.MOSTLY_Q3_K_S: Q.Q3_K,
    FT.MOSTLY_Q3_K_M: Q.Q3_K,
    FT.MOSTLY_Q3_K_L: Q.Q3_K,
    FT.MOSTLY_Q4_K_S: Q.Q4_K,
    FT.MOSTLY_Q4_K_M: Q.Q4_K,
    FT.MOSTLY_Q5_K_S: Q.Q5_K,
    FT.MOSTLY_Q5_K_M: Q.Q5_K,
    FT.MOSTLY_Q6_K: Q.Q6_K,
}
UNQUANTIZED = (Q.F32, Q.F16, Q.BF16)  # main types that take no mix and no fallback

# What a 256-value block type becomes when rows are not a multiple of 256 (32-value types
# stay); a type whose block still does not divide the rows becomes F16.
ROW_FALLBACK: dict[Q, Q] = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

# Tensors llama.cpp never quantizes, besides vectors and names not ending in "weight": names
# containing one of these ...
KEEP_CONTAINING = (
    "_norm.weight",
    "ffn_gate_inp.weight",  # expert routers
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",  # T5's relative position bias
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
# ... and these whole names (position embeddings, BERT's token types).
KEEP_NAMED = ("position_embd.weight", "token_types.weight")


class Role(Enum):
    """What a tensor is, as far as the mixes care (llama.cpp's tensor_category)."""

    TOKEN_EMBD = "token_embd"
    OUTPUT = "output"
    # attention values, fused q/k/v (BLOOM's attn_qkv) and MLA's kv_b: llama.cpp's q/k/v
    # rules of its own are never reached, the attention-value ones come first
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_Q = "attn_q"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


ROLE_NAMES = {
    "output.weight": Role.OUTPUT,
    "token_embd.weight": Role.TOKEN_EMBD,
    "per_layer_token_embd.weight": Role.TOKEN_EMBD,
}
# first match wins (T5's cross_attn_v.weight is an ATTN_V; its attn_o.weight is OTHER)
ROLE_CONTAINING = (
    ("attn_qkv.weight", Role.ATTN_V),
    ("attn_kv_b.weight", Role.ATTN_V),
    ("attn_v.weight", Role.ATTN_V),
    ("attn_k.weight", Role.ATTN_K),
    ("attn_q.weight", Role.ATTN_Q),
    ("attn_output.weight", Role.ATTN_OUTPUT),
    ("ffn_up", Role.FFN_UP),
    ("ffn_gate", Role.FFN_GATE),
    ("ffn_down", Role.FFN_DOWN),
)


def role(name: str) -> Role:
    """A tensor's role, from its GGUF name."""
    if name in ROLE_NAMES:
        return ROLE_NAMES[name]
    return next((r for part, r in ROLE_CONTAINING if part in name), Role.OTHER)


@dataclass(frozen=True)
class Model:
    """What the mixes read besides tensor names and shapes (from the GGUF's parameters)."""

    arch: str
    n_layer: int  # {arch}.block_count: the count position rules divide (for T5, per stack)
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0

    @property
    def gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B, the one model size the mixes look at
        return self.arch == "llama" and self.n_layer == 80


@dataclass(frozen=True)
class Place:
    """Where a tensor is, for the position rules: the i-th of n of its role (llama.cpp counts
    in its own tensor order, `llama_order`), and the model."""

    i: int
    n: int
    model: Model
    has_imatrix: bool

    @property
    def more_bits(self) -> bool:
        """The first and last eighth of the positions, and every third one between."""
        i, n = self.i, self.n
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    @property
    def falcon(self) -> bool:
        return self.model.arch == "falcon"


Rule = Callable[[Place], "Q | None"]  # None: the main type stays

# Attention values (and fused q/k/v), by file type.
ATTN_V_RULES: dict[FT, Rule] = {
    FT.MOSTLY_Q2_K: lambda p: Q.Q4_K if p.model.gqa >= 4 else Q.Q3_K,
    FT.MOSTLY_Q3_K_M: lambda p: Q.Q5_K if p.i < 2 else Q.Q4_K,
    FT.MOSTLY_Q3_K_L: lambda p: Q.Q5_K,
    FT.MOSTLY_Q4_K_M: lambda p: Q.Q6_K if p.more_bits else None,
    FT.MOSTLY_Q5_K_M: lambda p: Q.Q6_K if p.more_bits else None,
    FT.MOSTLY_Q4_K_S: lambda p: Q.Q5_K if p.i < 4 else None,
}

# Feed-forward outputs, by file type: `i` is the tensor's place among them, `n` the block
# count (an encoder-decoder has twice as many ffn_down as blocks: the later ones all count
# as "last eighth").
FFN_DOWN_RULES: dict[FT, Rule] = {
    FT.MOSTLY_Q2_K: lambda p: Q.Q3_K,
    FT.MOSTLY_Q3_K_M: lambda p: Q.Q5_K if p.i < p.n // 16 else Q.Q4_K if not p.falcon or p.more_bits else Q.Q3_K,
    FT.MOSTLY_Q3_K_L: lambda p: Q.Q4_K if p.falcon else Q.Q5_K,
    FT.MOSTLY_Q4_K_M: lambda p: (
        (Q.Q6_K if p.i < p.n // 16 else Q.Q5_K if p.more_bits else Q.Q4_K)
        if p.falcon
        else (Q.Q6_K if p.more_bits else None)
    ),
    FT.MOSTLY_Q5_K_M: lambda p: Q.Q6_K if p.more_bits else None,
    FT.MOSTLY_Q4_K_S: lambda p: Q.Q5_K if not p.falcon and p.i < p.n // 8 else None,
    # only with an importance matrix, so that a file without one quantizes as it always did
    FT.MOSTLY_Q4_0: lambda p: Q.Q4_1 if p.has_imatrix and p.i < p.n // 8 else None,
    FT.MOSTLY_Q5_0: lambda p: Q.Q5_1 if p.has_imatrix and p.i < p.n // 8 else None,
}

# Attention output projections, by file type (Falcon has its own table).
ATTN_OUTPUT_TYPES: dict[FT, Q] = {FT.MOSTLY_Q2_K: Q.Q3_K, FT.MOSTLY_Q3_K_M: Q.Q4_K, FT.MOSTLY_Q3_K_L: Q.Q5_K}
FALCON_ATTN_OUTPUT_TYPES: dict[FT, Q] = {FT.MOSTLY_Q3_K_L: Q.Q4_K}


def head_type(main: Q, n_per_row: int, model: Model) -> Q:
    """The output head's type (and a tied token embedding's): Q6_K, Q8_0 where the main
    type is Q8_0, for Falcon, or where rows are not whole blocks of the main type."""
    if model.arch == "falcon" or n_per_row % gguf.GGML_QUANT_SIZES[main][0]:
        return Q.Q8_0
    return Q.Q8_0 if main == Q.Q8_0 else Q.Q6_K


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """Whether llama.cpp quantizes this tensor at all (else it keeps the type it has)."""
    if all(d == 1 for d in shape[:-1]):  # ggml sees fewer than 2 dimensions
        return False
    if not name.endswith("weight") or name in KEEP_NAMED:
        return False
    return not any(part in name for part in KEEP_CONTAINING)


_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def llama_order(names: Sequence[str]) -> list[str]:
    """The order llama.cpp's quantizer visits (and writes) tensors: by the block number of
    names starting `blk.N.` (others first), then by name; T5's `enc.blk.`/`dec.blk.` names
    have no such number and sort by name alone."""

    def key(name: str) -> tuple[int, bytes]:
        m = _LAYER.match(name)
        return (int(m.group(1)) if m else -1, name.encode())

    return sorted(names, key=key)


def apply_fallback(qtype: Q, n_per_row: int) -> Q:
    """`qtype`, or what llama.cpp stores instead when rows are not whole blocks of it."""
    if n_per_row % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = ROW_FALLBACK.get(qtype, qtype)
    if gguf.GGML_QUANT_SIZES[qtype][0] > 32:
        raise PocketLMError(f"no fallback type for {qtype.name}")
    return qtype if n_per_row % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


@dataclass(frozen=True)
class Choice:
    """A tensor's type, and the type it would have had if its rows fitted (else None)."""

    type: Q
    wanted: Q | None = None


def choose(
    tensors: Sequence[tuple[str, tuple[int, ...], Q]],
    file_type: FT,
    model: Model,
    output_type: Q | None = None,
    has_imatrix: bool = False,
) -> dict[str, Choice]:
    """Each tensor's type under `file_type`, as llama_model_quantize chooses it for a file
    holding `tensors` (name, numpy-order shape, type it has there). `output_type`: the head's
    type instead of the mix's (llama_model_quantize_params.output_tensor_type)."""
    main = MAIN_TYPE.get(file_type)
    if main is None:
        raise UnsupportedModelError(f"PocketLM does not write GGUF file type {file_type.name} itself")
    if model.n_expert > 1:
        raise UnsupportedModelError("PocketLM's quantizer does not state llama.cpp's choices for expert models")
    names = [name for name, _, _ in tensors]
    tied = "output.weight" not in names
    # the n of the position rules: attn_v-like tensors as counted, ffn_down by block count
    counts = {Role.ATTN_V: sum(role(n) == Role.ATTN_V for n in names), Role.FFN_DOWN: model.n_layer}
    seen = {Role.ATTN_V: 0, Role.FFN_DOWN: 0}
    info = {name: (shape, has) for name, shape, has in tensors}
    out: dict[str, Choice] = {}
    for name in llama_order(names):
        shape, has = info[name]
        if not quantizable(name, shape):
            out[name] = Choice(has)
            continue
        r = role(name)
        if output_type is not None and r == Role.OUTPUT:
            if shape[-1] % gguf.GGML_QUANT_SIZES[output_type][0]:  # llama.cpp applies no fallback here
                raise PocketLMError(
                    f"{name}: rows of {shape[-1]} values cannot be stored as {output_type.name.lower()} "
                    "(choose another --output-type)"
                )
            out[name] = Choice(output_type)
            continue
        if main in UNQUANTIZED:
            out[name] = Choice(main)
            continue
        n_per_row = shape[-1]
        if r == Role.OUTPUT or (tied and r == Role.TOKEN_EMBD):
            wanted = output_type if output_type is not None else head_type(main, n_per_row, model)
        elif r in seen:
            place = Place(seen[r], counts[r], model, has_imatrix)
            rule = (ATTN_V_RULES if r == Role.ATTN_V else FFN_DOWN_RULES).get(file_type)
            better = rule(place) if rule else None
            wanted = main if better is None else better
            if r == Role.ATTN_V and model.is_70b and wanted in (Q.Q3_K, Q.Q4_K):
                wanted = Q.Q5_K  # 70B's shared attn_v is small: more bits cost little
            seen[r] += 1
        elif r == Role.ATTN_OUTPUT:
            wanted = (FALCON_ATTN_OUTPUT_TYPES if model.arch == "falcon" else ATTN_OUTPUT_TYPES).get(file_type, main)
        else:
            wanted = main
        used = apply_fallback(wanted, n_per_row)
        out[name] = Choice(used, wanted if used != wanted else None)
    return out
