"""BLOOM / BLOOMZ (BloomForCausalLM) -> GGUF `bloom`, as llama.cpp's BLOOM graph expects.

Names come from gguf-py's tensor tables. The one layout change: HF stores the fused
query_key_value rows per head as [n_head, (q, k, v), head_dim]; llama.cpp splits the fused
tensor into all-q, all-k, all-v, i.e. [(q, k, v), n_head, head_dim].
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from ..checkpoint import Checkpoint
from ..core.checks import check_config_layers, check_config_token_ids
from ..core.errors import UnsupportedModelError
from ..plan import GGUFPlan, TensorPlan, check_all_used, config_context, config_epsilon, config_int, expect
from ..vocab import add_no_vocab, add_vocab, read_bpe_tokenizer
from . import Architecture, Target, register

DEFAULT_CONTEXT = 2048  # BLOOM's training length; its config does not record it


def _hparams(config: dict[str, Any], where: str) -> dict[str, Any]:
    if config.get("apply_residual_connection_post_layernorm"):
        raise UnsupportedModelError(
            f"{where}: apply_residual_connection_post_layernorm=true is not supported by llama.cpp"
        )
    hidden = config_int(config, where, "hidden_size", "n_embed")
    n_head = config_int(config, where, "n_head", "num_attention_heads")
    if n_head == 0 or hidden % n_head:
        raise UnsupportedModelError(f"{where}: hidden_size {hidden} is not divisible by n_head {n_head}")
    return {
        "hidden": hidden,
        "n_head": n_head,
        "n_layer": config_int(config, where, "n_layer", "num_hidden_layers"),
        "vocab": config_int(config, where, "vocab_size"),
        "eps": config_epsilon(config, where, "layer_norm_epsilon", 1e-5),
        "context": config_context(config, where, "seq_length", "n_positions", default=DEFAULT_CONTEXT),
    }


def qkv_to_llama(arr: np.ndarray, n_head: int) -> np.ndarray:
    """[n_head, 3, head_dim, ...] rows -> [3, n_head, head_dim, ...] rows (weight or bias)."""
    rest = arr.shape[1:]
    grouped = np.asarray(arr).reshape(n_head, 3, -1, *rest)
    return np.ascontiguousarray(grouped.swapaxes(0, 1)).reshape(arr.shape)


def plan_gguf(ckpt: Checkpoint) -> GGUFPlan:
    where = str(ckpt.folder / "config.json")
    hp = _hparams(ckpt.config, where)
    hidden, n_head, n_layer, vocab = hp["hidden"], hp["n_head"], hp["n_layer"], hp["vocab"]
    ffn = 4 * hidden
    prefix = "transformer." if "transformer.word_embeddings.weight" in ckpt else ""
    # before any per-layer work: a config may claim a billion layers, or ids past the vocabulary
    layers_key = next((k for k in ("n_layer", "num_hidden_layers") if ckpt.config.get(k) is not None), "n_layer")
    check_config_layers(where, layers_key, n_layer, ckpt.names(), prefix + "h.")
    check_config_token_ids(ckpt.config, where, vocab)

    expected: dict[str, tuple[int, ...]] = {
        "word_embeddings.weight": (vocab, hidden),
        "word_embeddings_layernorm.weight": (hidden,),
        "word_embeddings_layernorm.bias": (hidden,),
        "ln_f.weight": (hidden,),
        "ln_f.bias": (hidden,),
    }
    for i in range(n_layer):
        expected.update(
            {
                f"h.{i}.input_layernorm.weight": (hidden,),
                f"h.{i}.input_layernorm.bias": (hidden,),
                f"h.{i}.self_attention.query_key_value.weight": (3 * hidden, hidden),
                f"h.{i}.self_attention.query_key_value.bias": (3 * hidden,),
                f"h.{i}.self_attention.dense.weight": (hidden, hidden),
                f"h.{i}.self_attention.dense.bias": (hidden,),
                f"h.{i}.post_attention_layernorm.weight": (hidden,),
                f"h.{i}.post_attention_layernorm.bias": (hidden,),
                f"h.{i}.mlp.dense_h_to_4h.weight": (ffn, hidden),
                f"h.{i}.mlp.dense_h_to_4h.bias": (ffn,),
                f"h.{i}.mlp.dense_4h_to_h.weight": (hidden, ffn),
                f"h.{i}.mlp.dense_4h_to_h.bias": (hidden,),
            }
        )

    for hf_name, shape in expected.items():
        expect(ckpt, prefix + hf_name, shape)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BLOOM, n_layer)  # costs time per layer
    tensors = []
    for hf_name, shape in expected.items():
        source = prefix + hf_name
        target = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UnsupportedModelError(f"no GGUF name for BLOOM tensor {hf_name}")
        if "query_key_value" in hf_name:
            load = lambda s=source: qkv_to_llama(np.asarray(ckpt.get(s)), n_head)
        else:
            load = lambda s=source: ckpt.get(s)
        tensors.append(TensorPlan(target, shape, load, (source,)))

    used = {prefix + n for n in expected}
    tied = ckpt.config.get("tie_word_embeddings", True) is not False
    if "lm_head.weight" in ckpt and not tied:
        expect(ckpt, "lm_head.weight", (vocab, hidden))
        tensors.append(
            TensorPlan("output.weight", (vocab, hidden), lambda: ckpt.get("lm_head.weight"), ("lm_head.weight",))
        )
        used.add("lm_head.weight")
    # A tied lm_head.weight is a copy of the embedding: llama.cpp reuses token_embd instead.
    check_all_used(ckpt, used, ignorable=lambda n: n == "lm_head.weight" or n.endswith(".attn.masked_bias"))

    tokenizer = ckpt.folder / "tokenizer.json"
    warnings = []
    vocab_keys = None
    if tokenizer.is_file():
        vocab_keys = read_bpe_tokenizer(tokenizer, vocab, ckpt.config)
    else:
        warnings.append(f"{ckpt.folder}: no tokenizer.json; the model will run on token ids only")

    def set_parameters(w: gguf.GGUFWriter) -> None:
        w.add_context_length(hp["context"])
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(ffn)
        w.add_block_count(n_layer)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head)
        w.add_layer_norm_eps(hp["eps"])
        if vocab_keys is not None:
            add_vocab(w, vocab_keys)
        else:
            add_no_vocab(w, vocab, ckpt.config)

    return GGUFPlan("bloom", set_parameters, tensors, vocab_keys is not None, warnings)


BLOOM = register(
    Architecture(
        name="bloom",
        hf_architectures=("BloomForCausalLM", "BloomModel"),
        model_types=("bloom",),
        family="BLOOM, BLOOMZ",
        needs_prompt_end=True,  # BLOOMZ's model card
        # memory-bound decoding: 4-bit K-quants are the best speed/quality point (benchmarks/)
        targets={"gguf": Target(plan_gguf, default_quant="q4_k_m")},
    )
)
