"""Tiny random checkpoints built with transformers, the reference implementation.

Tests only: this is the one place torch and transformers are imported. Each builder saves a
checkpoint in a chosen storage layout and returns the model transformers itself loads back
from those files, so every comparison is against what HF would compute from the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

STORAGES = ("safetensors", "sharded", "bin", "bin-sharded")
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def save_state_dict_bin(state: dict[str, torch.Tensor], folder: Path, shards: int = 1) -> None:
    """Write pytorch_model.bin (or N shards + index) with torch.save, as HF did for years."""
    names = list(state)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    weight_map = {}
    groups = [names[i::shards] for i in range(shards)]
    for i, group in enumerate(groups, 1):
        fname = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n].clone() for n in group}, folder / fname)
        weight_map.update({n: fname for n in group})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save(model: Any, folder: Path, storage: str, dtype: str = "f32") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(TORCH_DTYPES[dtype])
    if storage == "safetensors":
        model.save_pretrained(folder)
    elif storage == "sharded":
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(folder, max_shard_size=max(total // 3, 1))
        assert (folder / "model.safetensors.index.json").is_file()
    elif storage in ("bin", "bin-sharded"):
        model.config.save_pretrained(folder)
        save_state_dict_bin(model.state_dict(), folder, shards=1 if storage == "bin" else 3)
    else:
        raise ValueError(storage)


def make_bloom(
    folder: Path,
    *,
    hidden: int = 80,
    n_layer: int = 2,
    n_head: int = 5,
    vocab: int = 320,
    eps: float = 1e-6,
    storage: str = "safetensors",
    dtype: str = "f32",
    seed: int = 0,
    init: float = 0.02,
    tokenizer: Any = None,
) -> Any:
    """Save a random BLOOM and return transformers' float32 model loaded from the saved files."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        n_layer=n_layer,
        n_head=n_head,
        layer_norm_epsilon=eps,
        initializer_range=init,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot hide
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("ln_f.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save(model, folder, storage, dtype)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return BloomForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model: Any, ids: list[int], n: int, **kwargs: Any) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


def random_ids(n: int, vocab: int, seed: int = 0, low: int = 4) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(low, vocab, n)]


def write_state(state: dict[str, torch.Tensor], config: dict[str, Any], folder: Path, storage: str) -> None:
    """Write a state dict (and config.json) in any storage layout, tensors as given."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if storage in ("bin", "bin-sharded"):
        save_state_dict_bin(state, folder, shards=1 if storage == "bin" else 3)
    elif storage == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif storage == "sharded":
        names = list(state)
        weight_map = {}
        for i in range(3):
            fname = f"model-{i + 1:05d}-of-00003.safetensors"
            part = {n: state[n] for n in names[i::3]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(storage)


T5_HEADS = ("untied", "tied-scaled", "tied-unscaled")


def make_t5(
    folder: Path,
    *,
    d_model: int = 64,
    d_kv: int = 16,
    n_heads: int = 4,
    d_ff: int = 96,
    n_layers: int = 2,
    n_dec: int | None = None,
    vocab: int = 160,
    ff: str = "gated-gelu",
    head: str = "untied",
    buckets: int = 32,
    max_distance: int = 128,
    storage: str = "safetensors",
    dtype: str = "f32",
    seed: int = 0,
    model_type: str = "t5",
    tokenizer_files: dict[str, Path] | None = None,
) -> Any:
    """Save a random T5 (or mT5) checkpoint and return transformers' model loaded from it.

    head: "untied" is what real Flan-T5/mT0/T0 files are (own lm_head.weight,
    tie_word_embeddings false, unscaled); "tied-scaled" is original T5; "tied-unscaled" is
    a T5 v1.1 saved by transformers 5 (tied, scale_decoder_outputs false).
    """
    from transformers import AutoModelForSeq2SeqLM, MT5Config, T5Config

    torch.manual_seed(seed)
    cls = MT5Config if model_type == "mt5" else T5Config
    config = cls(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=n_layers,
        num_decoder_layers=n_dec,
        num_heads=n_heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=max_distance,
        feed_forward_proj=ff,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=head == "tied-scaled",
    )
    from transformers import MT5ForConditionalGeneration, T5ForConditionalGeneration

    model = (MT5ForConditionalGeneration if model_type == "mt5" else T5ForConditionalGeneration)(config).eval()
    with torch.no_grad():  # T5 initialises norms to 1: perturb them so a misplaced one shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(TORCH_DTYPES[dtype])
    state = {
        k: v
        for k, v in model.state_dict().items()
        if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
    }
    if storage.startswith("bin"):  # old checkpoints carry the tied copies too
        state.update(
            {
                k: model.state_dict()["shared.weight"]
                for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
            }
        )
    cfg = config.to_dict()
    cfg["architectures"] = ["MT5ForConditionalGeneration" if model_type == "mt5" else "T5ForConditionalGeneration"]
    if head == "untied":
        state["lm_head.weight"] = (torch.randn(vocab, d_model) * d_model**-0.5).to(TORCH_DTYPES[dtype])
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
    write_state(state, cfg, folder, storage)
    for name, path in (tokenizer_files or {}).items():
        (folder / name).write_bytes(Path(path).read_bytes())
    ref = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
    untied = not torch.equal(ref.lm_head.weight, ref.shared.weight)
    assert untied == (head == "untied"), f"transformers loaded head {head} as untied={untied}"
    assert getattr(ref.config, "scale_decoder_outputs", False) == (head == "tied-scaled")
    return ref


def make_t5_tokenizer(folder: Path, texts: list[str], pieces: int = 150) -> dict[str, Path]:
    """Train a small SentencePiece unigram model and let transformers build T5's tokenizer.json
    from it (100 sentinels, </s> appended). Returns {"spiece.model": ..., "tokenizer.json": ...}."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(texts * 3))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spiece"),
        vocab_size=pieces,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    T5Tokenizer.from_pretrained(folder, extra_ids=100).save_pretrained(folder / "hf")
    return {"spiece.model": folder / "spiece.model", "tokenizer.json": folder / "hf" / "tokenizer.json"}


def hf_seq2seq_logits(model: Any, input_ids: list[int], decoder_input_ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([input_ids]), decoder_input_ids=torch.tensor([decoder_input_ids]))
    return out.logits[0].float().numpy()


def hf_seq2seq_greedy(model: Any, input_ids: list[int], n: int, **kwargs: Any) -> list[int]:
    with torch.no_grad():
        # use_cache=False: transformers' cache is sized by num_layers and breaks when the
        # decoder is deeper than the encoder; without it the reference is exact, just slower.
        out = model.generate(
            torch.tensor([input_ids]),
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            use_cache=False,
            **kwargs,
        )
    return out[0, 1:].tolist()  # drop the decoder start token


T5_CORPUS = [
    "Translate to English: Je t'aime. I love you.",
    "一个传奇的开端，一个不灭的神话，这不仅仅是一部电影。",
    "Die Katze sitzt auf der Matte. Où est la bibliothèque ? Ça va très bien, merci !",
    "def add(a, b):\n    return a + b  # 🙂 emojis, tabs\tand   runs of spaces",
    "नमस्ते दुनिया। مرحبا بالعالم، كيف حالك؟ Привет, мир! こんにちは世界。",
    "Translate English to German: The house is wonderful.",
    "Question: What is the capital of France? Answer: Paris.",
    "Größenwahn, naïve café, façade, smørrebrød, Dvořák, São Paulo.",
    "機械学習は人工知能の一分野です。深層学習と自然言語処理。",
    "Review: this movie was great! Is this review positive or negative?",
]
T5_PROBES = [
    "Translate to English: Je t'aime.",
    "summarize: The quick brown fox jumps over the lazy dog.",
    "Größe über alles — très bien !",
    "東京都。北京市，上海市",
    "emoji 🙂 and unseen ǅʬ letters",
    "multiple   spaces\tand\nnewlines",
    "  leading and trailing  ",
    "The <extra_id_0> walks in <extra_id_1> park.",
    "<extra_id_0>word a<extra_id_1>b </s> inside <unk>",
    "ﬁ ligature ① ｆｕｌｌ\u3000ｗｉｄｔｈ, nbsp\u00a0here, ÅÅÅ, e\u0301",
    "नमस्ते दुनिया। مرحبا بالعالم Привет, мир! 한국어",
    "x",
    "",
]
T5_PIECES = 180
