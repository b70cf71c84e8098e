"""The numbers a model file states, checked against what it holds before anything is sized by them.

A config.json or a GGUF header states layer counts, widths, context lengths, epsilons and
token ids, and engines trust them: llama.cpp aborts the process on a NaN epsilon or on more
than 512 blocks, sizes its KV cache by a context of 4e9 tokens, and a converter would build
a per-layer plan for a billion layers. The converters and the GGUF loader call these checks
first, before any per-layer work or allocation; each failure is one line naming the file,
the key and the value. The KV cache's size per token (`kv_cell_bytes`) is computed here too,
from the checked sizes, for the runtime and `pocketlm info` alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .errors import CheckpointError, ModelLoadError, PocketLMError, UnsupportedModelError
from .gguf_file import IMATRIX_TYPE

INT32_MAX = 2**31 - 1  # llama.cpp keeps contexts, widths and token ids in int32
LLAMA_MAX_LAYERS = 512  # llama.cpp aborts (GGML_ASSERT) on a block_count above this
LLAMA_MAX_EXPERTS = 1024  # ... and on an expert_count above this
SPECIAL_TOKENS = ("bos", "eos", "pad", "unk", "decoder_start")  # config.json's <name>_token_id keys

_K, _A = gguf.Keys.LLM, gguf.Keys.Attention
# Sizes llama.cpp reads, each a count from 1 to INT32_MAX when present; these may give one per block.
_PER_BLOCK = (_K.FEED_FORWARD_LENGTH, _A.HEAD_COUNT, _A.HEAD_COUNT_KV)
_SIZES = (
    *_PER_BLOCK,
    _K.CONTEXT_LENGTH,
    _K.EMBEDDING_LENGTH,
    _K.BLOCK_COUNT,
    _K.DECODER_BLOCK_COUNT,
    _K.VOCAB_SIZE,
    _A.KEY_LENGTH,
    _A.VALUE_LENGTH,
    _A.REL_BUCKETS_COUNT,
)
_REQUIRED = (_K.CONTEXT_LENGTH, _K.EMBEDDING_LENGTH, _K.BLOCK_COUNT, _A.HEAD_COUNT)  # what sizes the model
TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
# GGUF block prefixes: decoder-only models, then an encoder-decoder's two stacks (llama.cpp's t5)
BLOCKS, ENCODER_BLOCKS, DECODER_BLOCKS = "blk.", "enc.blk.", "dec.blk."


# -- shared by config.json and GGUF checks --------------------------------------------------


def count(where: Any, key: str, value: Any, error: type[PocketLMError], low: int = 1, high: int = INT32_MAX) -> int:
    """`value` if it is an integer from `low` to `high`, else `error` naming key and value."""
    if type(value) is not int or not low <= value <= high:
        raise error(f"{where}: {key}={value!r} is not a count from {low} to {high}")
    return value


def epsilon(where: Any, key: str, value: Any, error: type[PocketLMError]) -> float:
    """A normalisation epsilon: a finite number above 0 (llama.cpp asserts eps >= 0, then divides)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise error(f"{where}: {key}={value!r} is not a positive finite number (a normalisation epsilon)")
    return float(value)


def token_id(where: Any, key: str, value: Any, vocab: int, error: type[PocketLMError]) -> int:
    """A token id of a vocabulary of `vocab` tokens."""
    if type(value) is not int or not 0 <= value < vocab:
        raise error(f"{where}: {key}={value!r} is not a token id (the vocabulary has {vocab} tokens)")
    return value


def block_indices(names: Iterable[str], prefix: str) -> set[int]:
    """The N of every tensor name `prefix`N.… (`blk.3.attn_norm.weight` -> 3 for "blk.")."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for name in names if (m := pattern.match(name))}


def check_blocks(
    where: Any,
    key: str,
    claimed: int,
    names: Iterable[str],
    prefix: str,
    error: type[PocketLMError],
    exact: bool,
    holder: str = "the file holds",
) -> None:
    """`claimed` blocks 0..claimed-1 are present as `prefix`N tensors (with `exact`, no others).

    Costs one pass over the names whatever `claimed` says: call it before any per-layer work."""
    present = block_indices(names, prefix)
    covered = sum(1 for i in present if i < claimed)
    if covered == claimed and (not exact or len(present) == claimed):
        return
    low, high = (min(present), max(present)) if present else (None, None)
    span = "none" if not present else f"{prefix}{low}" if low == high else f"{prefix}{low} to {prefix}{high}"
    n = len(present)
    raise error(f"{where}: {key}={claimed}, but {holder} {n} block{'' if n == 1 else 's'} ({span})")


# -- config.json (converters) ----------------------------------------------------------------


def check_config_layers(where: Any, key: str, claimed: int, names: Iterable[str], prefix: str) -> None:
    """A config's layer count against the checkpoint's `prefix`N tensors, before per-layer work.

    Layers beyond the config's count are left to the unmapped-tensor check (which names one)."""
    check_blocks(where, key, claimed, names, prefix, CheckpointError, exact=False, holder="the checkpoint has")


def check_config_token_ids(
    config: dict[str, Any], where: Any, vocab: int, names: Iterable[str] = SPECIAL_TOKENS
) -> None:
    """Every `<name>_token_id` the config sets (one id or a list) is a token of the vocabulary."""
    for name in names:
        key = f"{name}_token_id"
        value = config.get(key)
        for item in value if isinstance(value, list) else [] if value is None else [value]:
            token_id(where, key, item, vocab, UnsupportedModelError)


# -- GGUF headers (the loader, quantize) ------------------------------------------------------


@dataclass(frozen=True)
class GGUFDims:
    """A checked GGUF model's sizes, as llama.cpp reads them."""

    n_ctx_train: int
    n_embd: int
    n_layer: int  # block_count: the blocks holding a KV cache
    n_head: int
    n_head_kv: int  # the largest, when the file gives one per block
    head_k: int  # key and value width of one head
    head_v: int
    n_vocab: int


def kv_cell_bytes(dims: GGUFDims, type_bytes: int) -> int:
    """Bytes one token takes in llama.cpp's KV cache: K and V rows of every block,
    n_head_kv x head width each, in a `type_bytes` type (2 for f16, 4 for f32)."""
    return dims.n_layer * dims.n_head_kv * (dims.head_k + dims.head_v) * type_bytes


def check_gguf(header: Any, path: str | Path) -> GGUFDims:
    """Check a GGUF model's metadata against its tensors (a `gguf_file.GGUFHeader`) before
    llama.cpp loads it; its sizes. ModelLoadError names the file, the key and the value."""
    meta, arch = header.metadata, header.architecture
    if meta.get(gguf.Keys.General.TYPE) == IMATRIX_TYPE:
        raise ModelLoadError(f"{path}: an importance matrix, not a model (it is for `pocketlm quantize --imatrix`)")
    tensors = {t.name: t.shape for t in header.tensors}

    def key(template: str) -> str:
        return template.format(arch=arch)

    for template in _REQUIRED:
        if key(template) not in meta:
            raise ModelLoadError(f"{path}: lacks {key(template)} (not a complete {arch} model)")
    for template in _SIZES:
        value = meta.get(key(template))
        per_block = template in _PER_BLOCK and isinstance(value, list)
        for item in value if per_block else [] if value is None else [value]:
            count(path, key(template), item, ModelLoadError)
    for name, value in meta.items():
        if name.startswith(f"{arch}.") and name.endswith("epsilon"):
            epsilon(path, name, value, ModelLoadError)
    n_layer = meta[key(_K.BLOCK_COUNT)]
    _check_gguf_blocks(path, key, meta, tensors, n_layer)
    _check_experts(path, key, meta)
    n_embd = meta[key(_K.EMBEDDING_LENGTH)]
    n_head, n_head_kv, head_k, head_v = _heads(path, key, meta, n_embd)
    n_vocab = _vocab(path, key, meta, header.array_lengths, tensors, n_embd)
    start = key(_K.DECODER_START_TOKEN_ID)
    for name, value in meta.items():
        if name == start or (name.startswith("tokenizer.ggml.") and name.endswith("_token_id")):
            token_id(path, name, value, n_vocab, ModelLoadError)
    return GGUFDims(meta[key(_K.CONTEXT_LENGTH)], n_embd, n_layer, n_head, n_head_kv, head_k, head_v, n_vocab)


def _check_gguf_blocks(path: Any, key: Any, meta: dict[str, Any], tensors: dict[str, Any], n_layer: int) -> None:
    """block_count (and an encoder-decoder's decoder_block_count) against the blocks present."""
    if block_indices(tensors, ENCODER_BLOCKS) or block_indices(tensors, DECODER_BLOCKS):
        n_dec = meta.get(key(_K.DECODER_BLOCK_COUNT), n_layer)
        check_blocks(path, key(_K.BLOCK_COUNT), n_layer, tensors, ENCODER_BLOCKS, ModelLoadError, exact=True)
        check_blocks(path, key(_K.DECODER_BLOCK_COUNT), n_dec, tensors, DECODER_BLOCKS, ModelLoadError, exact=True)
    else:
        check_blocks(path, key(_K.BLOCK_COUNT), n_layer, tensors, BLOCKS, ModelLoadError, exact=True)
    if n_layer > LLAMA_MAX_LAYERS:  # an assertion in llama.cpp: the process would abort
        raise ModelLoadError(
            f"{path}: {key(_K.BLOCK_COUNT)}={n_layer}; llama.cpp runs at most {LLAMA_MAX_LAYERS} blocks"
        )


def _check_experts(path: Any, key: Any, meta: dict[str, Any]) -> None:
    """Mixture-of-experts counts llama.cpp asserts on (any architecture may carry the keys)."""
    experts = count(path, key(_K.EXPERT_COUNT), meta.get(key(_K.EXPERT_COUNT), 0), ModelLoadError, 0, LLAMA_MAX_EXPERTS)
    used = meta.get(key(_K.EXPERT_USED_COUNT), 0)
    for item in used if isinstance(used, list) else [used]:
        count(path, key(_K.EXPERT_USED_COUNT), item, ModelLoadError, 1 if experts else 0, experts)


def _heads(path: Any, key: Any, meta: dict[str, Any], n_embd: int) -> tuple[int, int, int, int]:
    """(heads, largest KV head count, key width, value width of a head). Heads divide the width
    unless the file gives both head widths, which must be equal (llama.cpp's graphs assert it),
    and KV heads divide the heads (grouped-query attention)."""
    heads = meta[key(_A.HEAD_COUNT)]
    heads = heads if isinstance(heads, list) else [heads]
    kv = meta.get(key(_A.HEAD_COUNT_KV), heads)
    kv = kv if isinstance(kv, list) else [kv] * len(heads)
    n_head = heads[0]
    widths = [key(_A.KEY_LENGTH), key(_A.VALUE_LENGTH)]
    if not all(w in meta for w in widths) and n_embd % n_head:
        raise ModelLoadError(
            f"{path}: {key(_A.HEAD_COUNT)}={n_head} does not divide {key(_K.EMBEDDING_LENGTH)}={n_embd}"
        )
    head_k, head_v = (meta.get(w, n_embd // n_head) for w in widths)
    if head_k != head_v:
        raise ModelLoadError(f"{path}: {widths[0]}={head_k} differs from {widths[1]}={head_v}")
    for h, k in zip(heads, kv):
        if h % k:
            raise ModelLoadError(f"{path}: {key(_A.HEAD_COUNT_KV)}={k} does not divide {key(_A.HEAD_COUNT)}={h}")
    return n_head, max(kv), head_k, head_v


def _vocab(
    path: Any, key: Any, meta: dict[str, Any], lengths: dict[str, int], tensors: dict[str, Any], n_embd: int
) -> int:
    """The vocabulary size: token_embd's columns, which the token list (or vocab_size) and the
    output head must match, its rows the embedding width."""
    shape = tensors.get(TOKEN_EMBD)
    if shape is None or len(shape) != 2:
        raise ModelLoadError(f"{path}: lacks a two-dimensional tensor {TOKEN_EMBD}")
    if shape[0] != n_embd:
        raise ModelLoadError(
            f"{path}: {key(_K.EMBEDDING_LENGTH)}={n_embd}, but tensor {TOKEN_EMBD} has rows of {shape[0]}"
        )
    n_vocab = shape[1]
    tokens = meta.get(gguf.Keys.Tokenizer.LIST)
    stated = {
        gguf.Keys.Tokenizer.LIST: len(tokens) if isinstance(tokens, list) else lengths.get(gguf.Keys.Tokenizer.LIST),
        key(_K.VOCAB_SIZE): meta.get(key(_K.VOCAB_SIZE)),
    }
    for name, n in stated.items():
        if n is not None and n != n_vocab:
            raise ModelLoadError(f"{path}: {name} gives {n} tokens, but tensor {TOKEN_EMBD} has {n_vocab}")
    head = tensors.get(OUTPUT)
    if head is not None and tuple(head) != tuple(shape):
        raise ModelLoadError(f"{path}: tensor {OUTPUT} has shape {list(head)}, {TOKEN_EMBD} {list(shape)}")
    return n_vocab
