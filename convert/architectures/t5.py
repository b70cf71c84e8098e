"""T5, Flan-T5, mT5/mT0 and T0 (T5/MT5ForConditionalGeneration) -> CTranslate2 or GGUF.

CTranslate2: the model is described with `ctranslate2.specs` (a pre-norm, RMS-norm
Transformer with relative attention bias); every weight slot of that spec is filled, per the
table below, with a lazy `TensorPlan` that reads the Hugging Face tensors only when the
writer streams it.

GGUF: llama.cpp's encoder-decoder `t5` architecture, tensor names from gguf-py's T5 table.
llama.cpp applies no output scaling (folded into `output`), hard-codes the relative-position
max distance to 128 and picks the feed-forward from the presence of `ffn_gate` (gated: GELU,
tanh approximation; ungated: ReLU); models it would run differently are refused.

The output head has three meanings across transformers versions (see
../shared/model_configs/README.md): `scale_decoder_outputs` decides the d_model**-0.5
scaling when present, else scaling follows `tie_word_embeddings` (never for mT5); the head is
`lm_head.weight` when the file has it, else the shared embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from ..checkpoint import Checkpoint
from ..core import engine
from ..core.checks import check_config_layers, token_id
from ..core.errors import UnsupportedModelError
from ..plan import CT2Plan, GGUFPlan, TensorPlan, check_all_used, config_context, config_epsilon, config_int, expect
from ..vocab import add_no_vocab, add_vocab, read_t5_tokenizer, t5_vocabulary
from . import Architecture, Target, register

# CTranslate2 slot (under encoder/layer_{i} or decoder/layer_{i}) -> HF tensors (under
# encoder.block.{i}. or decoder.block.{i}.), rows concatenated when several (fused q|k|v).
ATTN = "layer.0.SelfAttention"
SELF_ATTENTION = {
    "self_attention/layer_norm/gamma": ["layer.0.layer_norm.weight"],
    "self_attention/linear_0/weight": [f"{ATTN}.q.weight", f"{ATTN}.k.weight", f"{ATTN}.v.weight"],
    "self_attention/linear_1/weight": [f"{ATTN}.o.weight"],
}
ENCODER_LAYER = {
    **SELF_ATTENTION,
    "ffn/layer_norm/gamma": ["layer.1.layer_norm.weight"],
    "ffn/linear_1/weight": ["layer.1.DenseReluDense.wo.weight"],
}
CROSS = "layer.1.EncDecAttention"
DECODER_LAYER = {
    **SELF_ATTENTION,
    "attention/layer_norm/gamma": ["layer.1.layer_norm.weight"],
    "attention/linear_0/weight": [f"{CROSS}.q.weight"],
    "attention/linear_1/weight": [f"{CROSS}.k.weight", f"{CROSS}.v.weight"],
    "attention/linear_2/weight": [f"{CROSS}.o.weight"],
    "ffn/layer_norm/gamma": ["layer.2.layer_norm.weight"],
    "ffn/linear_1/weight": ["layer.2.DenseReluDense.wo.weight"],
}
FFN_IN = {  # by gating: slot -> HF name, relative to the FFN sub-layer
    False: {"ffn/linear_0/weight": "DenseReluDense.wi.weight"},
    True: {
        "ffn/linear_0/weight": "DenseReluDense.wi_0.weight",
        "ffn/linear_0_noact/weight": "DenseReluDense.wi_1.weight",
    },
}
REL_BIAS = f"{ATTN}.relative_attention_bias.weight"
ACTIVATIONS = {
    "relu": "RELU",
    "gelu_new": "GELUTanh",
    "gelu": "GELUTanh",
    "gelu_fast": "GELUTanh",
    "gelu_pytorch_tanh": "GELUTanh",
    "silu": "SWISH",
    "swish": "SWISH",
}


SPECIAL_IDS = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}  # with T5's defaults


def _feed_forward(config: dict[str, Any], where: str) -> tuple[str, bool]:
    """(activation, gated) as transformers' T5Config reads them: `feed_forward_proj` is ACT or
    gated-ACT ("gated-gelu" runs gelu_new, the tanh approximation: T0pp's config has no
    dense_act_fn), a saved `dense_act_fn`/`is_gated_act` wins. Only activations this
    converter maps are accepted, in both."""
    proj = config.get("feed_forward_proj", "relu")
    parts = proj.split("-") if isinstance(proj, str) else []
    act = "gelu_new" if proj == "gated-gelu" else parts[-1] if parts else None
    if len(parts) not in (1, 2) or (len(parts) == 2 and parts[0] != "gated") or act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{where}: feed_forward_proj={proj!r} is not supported (ACT or gated-ACT, ACT one of "
            f"{', '.join(ACTIVATIONS)})"
        )
    dense = config.get("dense_act_fn") or act
    if not isinstance(dense, str) or dense not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{where}: dense_act_fn={dense!r} is not supported (one of {', '.join(ACTIVATIONS)})"
        )
    return dense, bool(config.get("is_gated_act", len(parts) == 2))


def _check_counts(ckpt: Checkpoint, p: T5Params, where: str) -> None:
    """Layer counts and the vocabulary against the checkpoint, before any per-layer work."""
    names = ckpt.names()
    check_config_layers(where, "num_layers", p.n_enc, names, "encoder.block.")
    check_config_layers(where, "num_decoder_layers", p.n_dec, names, "decoder.block.")
    expect(ckpt, _embedding_name(ckpt), (p.vocab, p.d_model))


@dataclass(frozen=True)
class T5Params:
    d_model: int
    d_kv: int
    d_ff: int
    n_heads: int
    n_enc: int
    n_dec: int
    vocab: int
    buckets: int
    max_distance: int
    eps: float
    activation: str
    gated: bool
    scale_outputs: bool
    decoder_start: int
    eos: int
    pad: int

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> T5Params:
        act, gated = _feed_forward(config, where)
        if "scale_decoder_outputs" in config:
            scale = bool(config["scale_decoder_outputs"])
        elif config.get("model_type") == "mt5":
            # mT5 was never released tied; transformers 5 forces tie_word_embeddings=true in
            # the mT5 configs it saves yet never scales mT5 outputs.
            scale = False
        else:
            scale = config.get("tie_word_embeddings", True) is not False
        n_enc = config_int(config, where, "num_layers")
        vocab = config_int(config, where, "vocab_size")
        ids = {key: config_int(config, where, key, default=d) for key, d in SPECIAL_IDS.items()}
        for key, value in ids.items():  # a start token past the vocabulary was an IndexError
            token_id(where, key, value, vocab, UnsupportedModelError)
        return cls(
            d_model=config_int(config, where, "d_model"),
            d_kv=config_int(config, where, "d_kv"),
            d_ff=config_int(config, where, "d_ff"),
            n_heads=config_int(config, where, "num_heads"),
            n_enc=n_enc,
            n_dec=config_int(config, where, "num_decoder_layers", default=n_enc),
            vocab=vocab,
            buckets=config_int(config, where, "relative_attention_num_buckets", default=32),
            max_distance=config_int(config, where, "relative_attention_max_distance", default=128),
            eps=config_epsilon(config, where, "layer_norm_epsilon", 1e-6),
            activation=act,
            gated=gated,
            scale_outputs=scale,
            decoder_start=ids["decoder_start_token_id"],
            eos=ids["eos_token_id"],
            pad=ids["pad_token_id"],
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every HF tensor name suffix."""
        inner, d = self.n_heads * self.d_kv, self.d_model
        return {
            "q": (inner, d),
            "k": (inner, d),
            "v": (inner, d),
            "o": (d, inner),
            "wi": (self.d_ff, d),
            "wi_0": (self.d_ff, d),
            "wi_1": (self.d_ff, d),
            "wo": (d, self.d_ff),
            "layer_norm": (d,),
            "relative_attention_bias": (self.buckets, self.n_heads),
        }


def _shape_of(hf_name: str, p: T5Params) -> tuple[int, ...]:
    part = hf_name.split(".")[-2]
    return p.shapes()[part]


class _Loader:
    """Makes (and remembers) one TensorPlan per distinct group of HF tensors."""

    def __init__(self, ckpt: Checkpoint, p: T5Params):
        self.ckpt, self.p = ckpt, p
        self.plans: dict[tuple[str, ...], TensorPlan] = {}
        self.used: set[str] = set()

    def plan(
        self, target: str, names: list[str], shapes: list[tuple[int, ...]], scale: float | None = None
    ) -> TensorPlan:
        key = tuple(names)
        if key in self.plans:
            return self.plans[key]
        for name, shape in zip(names, shapes):
            expect(self.ckpt, name, shape)
        self.used.update(names)
        rows = sum(s[0] for s in shapes)
        shape = (rows, *shapes[0][1:])
        ckpt = self.ckpt
        if len(names) == 1:
            load = lambda: ckpt.get(names[0])
        else:
            load = lambda: np.concatenate([np.asarray(ckpt.get(n)) for n in names])
        plan = TensorPlan(target, shape, load, key, scale)
        self.plans[key] = plan
        return plan


def _embedding_name(ckpt: Checkpoint) -> str:
    for name in ("shared.weight", "encoder.embed_tokens.weight"):
        if name in ckpt:
            return name
    return "shared.weight"  # reported as missing by expect()


def _head_is_embedding(ckpt: Checkpoint, emb: str) -> bool:
    """Whether lm_head.weight is absent or a stored copy of the embedding (then: one tensor)."""
    if "lm_head.weight" not in ckpt:
        return True
    a, b = ckpt.get(emb), ckpt.get("lm_head.weight")
    if ckpt.info(emb).dtype != ckpt.info("lm_head.weight").dtype or a.shape != b.shape:
        return False
    step = 4096
    return all(
        np.array_equal(np.asarray(a[i : i + step]), np.asarray(b[i : i + step])) for i in range(0, a.shape[0], step)
    )


def plan_ct2(ckpt: Checkpoint) -> CT2Plan:
    where = str(ckpt.folder / "config.json")
    p = T5Params.from_config(ckpt.config, where)
    _check_counts(ckpt, p, where)
    ct2 = engine.ctranslate2(specs=True)
    specs = ct2.specs
    spec = specs.TransformerSpec.from_config(
        (p.n_enc, p.n_dec),
        p.n_heads,
        pre_norm=True,
        activation=getattr(specs.common_spec.Activation, ACTIVATIONS[p.activation]),
        ffn_glu=p.gated,
        relative_attention_bias=True,
        rms_norm=True,
    )
    loader = _Loader(ckpt, p)
    emb_name = _embedding_name(ckpt)
    embedding = loader.plan("embeddings", [emb_name], [(p.vocab, p.d_model)])
    head = (
        embedding
        if _head_is_embedding(ckpt, emb_name)
        else loader.plan("projection", ["lm_head.weight"], [(p.vocab, p.d_model)])
    )

    for stack, layers, table in (("encoder", p.n_enc, ENCODER_LAYER), ("decoder", p.n_dec, DECODER_LAYER)):
        stack_spec = getattr(spec, stack)
        stack_spec.scale_embeddings = False
        stack_spec.layer_norm.gamma = loader.plan(
            f"{stack}/layer_norm", [f"{stack}.final_layer_norm.weight"], [(p.d_model,)]
        )
        emb_spec = stack_spec.embeddings[0] if isinstance(stack_spec.embeddings, list) else stack_spec.embeddings
        emb_spec.weight = embedding
        ffn_sub = "layer.1" if stack == "encoder" else "layer.2"
        slots = dict(table)
        slots.update({slot: [f"{ffn_sub}.{hf}"] for slot, hf in FFN_IN[p.gated].items()})
        bias_name = f"{stack}.block.0.{REL_BIAS}"
        rel_bias = loader.plan(f"{stack}/relative_attention_bias", [bias_name], [(p.buckets, p.n_heads)])
        for i in range(layers):
            layer = stack_spec.layer[i]
            for slot, hf_names in slots.items():
                names = [f"{stack}.block.{i}.{n}" for n in hf_names]
                owner_path, attr = slot.rsplit("/", 1)
                owner = specs.model_spec.index_spec(layer, owner_path)
                setattr(owner, attr, loader.plan(f"{stack}/layer_{i}/{slot}", names, [_shape_of(n, p) for n in names]))
            for attention in ("self_attention", "attention"):
                if hasattr(layer, attention):
                    getattr(layer, attention).queries_scale = 1.0
            layer.self_attention.relative_attention_bias = rel_bias
            layer.self_attention.relative_attention_max_distance = np.int32(p.max_distance)
    spec.decoder.projection.weight = head
    if p.scale_outputs:
        spec.decoder.scale_outputs = p.d_model**-0.5

    check_all_used(
        ckpt,
        loader.used,
        ignorable=lambda n: (
            n
            in (
                "lm_head.weight",
                "shared.weight",
                "encoder.embed_tokens.weight",
                "decoder.embed_tokens.weight",
            )
            or n.endswith("EncDecAttention.relative_attention_bias.weight")
        ),
    )

    vocab = t5_vocabulary(ckpt.folder, p.vocab, {"pad": p.pad, "eos": p.eos})
    spec.register_source_vocabulary(vocab.tokens)
    spec.register_target_vocabulary(vocab.tokens)
    config = {
        "bos_token": vocab.tokens[p.pad],
        "eos_token": vocab.tokens[p.eos],
        "unk_token": vocab.tokens[vocab.unk] if vocab.unk is not None else "<unk>",
        "decoder_start_token": vocab.tokens[p.decoder_start],
        "add_source_bos": False,
        "add_source_eos": False,
        "layer_norm_epsilon": p.eps,
    }
    files = {"tokenizer.json": vocab.tokenizer_json} if vocab.tokenizer_json is not None else {}
    runtime = {
        "decoder_start_token_id": p.decoder_start,
        "eos_token_id": p.eos,
        "pad_token_id": p.pad,
        "vocab_size": p.vocab,
        "tokenizer": "tokenizer.json" if files else None,
        "relative_attention_max_distance": p.max_distance,
    }
    return CT2Plan(
        spec=spec,
        vocabulary=vocab.tokens,
        config=config,
        files=files,
        runtime=runtime,
        warnings=vocab.warnings,
    )


# -- GGUF (llama.cpp `t5`) ---------------------------------------------------------------

# (gated, activation) pairs llama.cpp's t5 graph computes: it runs GELU (tanh approximation)
# when ffn_gate is present and ReLU otherwise, whatever the config says.
GGUF_FFN = {(False, "relu"), (True, "gelu_new"), (True, "gelu_pytorch_tanh"), (True, "gelu_fast")}
LLAMA_MAX_DISTANCE = 128  # llama_relative_position_bucket's constant
DEFAULT_CONTEXT = 512  # T5's training length, when config.json has no n_positions
EMBEDDING_COPIES = ("lm_head.weight", "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _check_gguf_support(p: T5Params, where: str) -> None:
    if p.max_distance != LLAMA_MAX_DISTANCE:
        raise UnsupportedModelError(
            f"{where}: relative_attention_max_distance={p.max_distance}, but llama.cpp's t5 always uses "
            f"{LLAMA_MAX_DISTANCE} (its outputs would be wrong); convert with format='ct2' instead"
        )
    if (p.gated, p.activation) not in GGUF_FFN:
        kind = "gated" if p.gated else "ungated"
        raise UnsupportedModelError(
            f"{where}: {kind} {p.activation} feed-forward; llama.cpp's t5 runs only ungated relu or gated "
            "tanh-GELU; convert with format='ct2' instead"
        )


def _gguf_layer_tensors(stack: str, p: T5Params) -> list[str]:
    """HF tensor names of one block (relative to {stack}.block.{i}.), from the CT2 tables."""
    table = ENCODER_LAYER if stack == "encoder" else DECODER_LAYER
    ffn_sub = "layer.1" if stack == "encoder" else "layer.2"
    return [n for names in table.values() for n in names] + [f"{ffn_sub}.{n}" for n in FFN_IN[p.gated].values()]


def _gguf_name(tmap: gguf.TensorNameMap, hf_name: str) -> str:
    target = tmap.get_name(hf_name, try_suffixes=(".weight",))
    if target is None:
        raise UnsupportedModelError(f"no GGUF name for T5 tensor {hf_name}")
    return target


def _identity_encoder_blocks(tmap: gguf.TensorNameMap, p: T5Params, blocks: range) -> list[TensorPlan]:
    """All-zero encoder blocks: each computes x + 0 + 0, exactly x.

    llama.cpp (0.3.36) sizes its per-layer tables by the encoder depth and fails to load a
    decoder deeper than the encoder; padding the encoder to the decoder's depth fixes that."""
    plans = []
    for i in blocks:
        for n in _gguf_layer_tensors("encoder", p):
            shape = _shape_of(n, p)
            plans.append(
                TensorPlan(_gguf_name(tmap, f"encoder.block.{i}.{n}"), shape, lambda s=shape: np.zeros(s, np.float32))
            )
    return plans


def plan_gguf(ckpt: Checkpoint) -> GGUFPlan:
    """The GGUF plan for llama.cpp's `t5` architecture (T5, Flan-T5, mT5/mT0, T0)."""
    where = str(ckpt.folder / "config.json")
    p = T5Params.from_config(ckpt.config, where)
    _check_gguf_support(p, where)
    _check_counts(ckpt, p, where)  # before the per-layer name map
    n_blocks = max(p.n_enc, p.n_dec)  # llama.cpp's block_count; the encoder is padded up to it
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, n_blocks)
    loader = _Loader(ckpt, p)

    emb_name = _embedding_name(ckpt)
    tensors = [loader.plan("token_embd.weight", [emb_name], [(p.vocab, p.d_model)])]
    for stack, n_layers in (("encoder", p.n_enc), ("decoder", p.n_dec)):
        for i in range(n_layers):
            names = [f"{stack}.block.{i}.{n}" for n in _gguf_layer_tensors(stack, p)]
            if i == 0:  # llama.cpp shares block 0's bias with the other blocks, as T5 does
                names.append(f"{stack}.block.0.{REL_BIAS}")
            tensors += [loader.plan(_gguf_name(tmap, n), [n], [_shape_of(n, p)]) for n in names]
        final = f"{stack}.final_layer_norm.weight"
        tensors.append(loader.plan(_gguf_name(tmap, final), [final], [(p.d_model,)]))
    tensors += _identity_encoder_blocks(tmap, p, range(p.n_enc, n_blocks))
    warnings = (
        []
        if n_blocks == p.n_enc
        else [
            f"{where}: the decoder ({p.n_dec} blocks) is deeper than the encoder ({p.n_enc}), which llama.cpp cannot "
            f"load; the encoder gets {n_blocks - p.n_enc} identity blocks (zero weights: same outputs, more encoder "
            "work)"
        ]
    )

    # llama.cpp reuses token_embd when `output` is absent, and never scales the decoder
    # output: a scaled head is written as its own tensor with d_model**-0.5 folded in.
    head = emb_name if _head_is_embedding(ckpt, emb_name) else "lm_head.weight"
    scale = p.d_model**-0.5 if p.scale_outputs else None
    if head != emb_name or scale is not None:
        expect(ckpt, head, (p.vocab, p.d_model))
        tensors.append(TensorPlan("output.weight", (p.vocab, p.d_model), lambda: ckpt.get(head), (head,), scale))
        loader.used.add(head)
    check_all_used(
        ckpt,
        loader.used,
        ignorable=lambda n: n in EMBEDDING_COPIES or n.endswith("EncDecAttention.relative_attention_bias.weight"),
    )

    vocab = read_t5_tokenizer(ckpt.folder, p.vocab, {"pad": p.pad, "eos": p.eos})
    warnings += (
        vocab.warnings
        if vocab
        else [f"{ckpt.folder}: no tokenizer.json or spiece.model; the model will run on token ids only"]
    )
    context = config_context(ckpt.config, where, "n_positions", default=DEFAULT_CONTEXT)

    def set_parameters(w: gguf.GGUFWriter) -> None:
        w.add_context_length(context)
        w.add_embedding_length(p.d_model)
        w.add_feed_forward_length(p.d_ff)
        w.add_block_count(n_blocks)
        if p.n_dec != n_blocks:
            w.add_decoder_block_count(p.n_dec)
        w.add_head_count(p.n_heads)
        w.add_head_count_kv(p.n_heads)
        w.add_key_length(p.d_kv)
        w.add_value_length(p.d_kv)
        w.add_layer_norm_rms_eps(p.eps)
        w.add_relative_attn_buckets_count(p.buckets)
        w.add_decoder_start_token_id(p.decoder_start)
        if vocab is not None:
            add_vocab(w, vocab)
        else:
            add_no_vocab(w, p.vocab, {"eos_token_id": p.eos, "pad_token_id": p.pad})

    return GGUFPlan("t5", set_parameters, tensors, vocab is not None, warnings)


T5 = register(
    Architecture(
        name="t5",
        hf_architectures=("T5ForConditionalGeneration", "MT5ForConditionalGeneration"),
        model_types=("t5", "mt5"),
        encoder_decoder=True,
        family="T5, Flan-T5, mT5/mT0, T0",
        targets={
            # CTranslate2 caches the encoder's cross-attention keys and values while llama.cpp's t5
            # graph recomputes them for every token: with a 128-token input it decoded mt0-large at
            # about twice llama.cpp's speed on CPU (flan-t5-small: even), and it batches.
            "ct2": Target(
                plan_ct2,
                default_quant="int8",
                why="CTranslate2 caches cross-attention and batches (faster than llama.cpp's t5 graph in benchmarks/)",
            ),
            # Small T5s lose more to 4-bit rounding and gain less from it: 8 bits by default.
            "gguf": Target(plan_gguf, default_quant="q8_0", why="the only format with a Metal engine"),
        },
    )
)
