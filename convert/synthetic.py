"""Small random checkpoints in Hugging Face layout, built with numpy (no torch).

Used where real weights are out of reach (`make run` on a machine with no download, shape
tests): a BLOOM with random weights and a byte-level BPE tokenizer trained on a few lines
with BLOOM's own pre-tokenizer, so the whole pipeline runs exactly as on the real model.
Its output is noise, and everything that prints it says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import write_safetensors
from .vocab import BLOOM_SPLIT_REGEX

SAMPLE_TEXT = [
    "Translate to English: Je t'aime. I love you.",
    "Explain in a sentence in Telugu what is backpropagation.",
    'Suggest at least five related search terms to "Mạng neural nhân tạo".',
    "Write a fairy tale about a troll saving a princess from a dangerous dragon.",
    "¿Qué es la inteligencia artificial? Es un campo de la informática.",
    "一个传奇的开端，一个不灭的神话，这不仅仅是一部电影。",
    "Die Katze sitzt auf der Matte. Où est la bibliothèque ? Ça va très bien, merci !",
    "def add(a, b):\n    return a + b  # 🙂 emojis, tabs\tand   runs of spaces",
    "नमस्ते दुनिया। مرحبا بالعالم، كيف حالك؟ Привет, мир! こんにちは世界。",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in BLOOM


def train_bloom_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with BLOOM's pre-tokenizer and special ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BLOOM_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def bloom_config(vocab_size: int, hidden: int, n_layer: int, n_head: int) -> dict[str, Any]:
    return {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "n_layer": n_layer,
        "n_head": n_head,
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "unk_token_id": 0,
        "apply_residual_connection_post_layernorm": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
    }


def random_bloom_weights(config: dict[str, Any], seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, v, f = config["hidden_size"], config["vocab_size"], 4 * config["hidden_size"]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)

    def norm() -> tuple[np.ndarray, np.ndarray]:
        return (1 + w(h)).astype(np.float16), w(h)

    t: dict[str, np.ndarray] = {"word_embeddings.weight": w(v, h)}
    t["word_embeddings_layernorm.weight"], t["word_embeddings_layernorm.bias"] = norm()
    for i in range(config["n_layer"]):
        p = f"h.{i}."
        t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"] = norm()
        t[p + "self_attention.query_key_value.weight"], t[p + "self_attention.query_key_value.bias"] = (
            w(3 * h, h),
            w(3 * h),
        )
        t[p + "self_attention.dense.weight"], t[p + "self_attention.dense.bias"] = w(h, h), w(h)
        t[p + "post_attention_layernorm.weight"], t[p + "post_attention_layernorm.bias"] = norm()
        t[p + "mlp.dense_h_to_4h.weight"], t[p + "mlp.dense_h_to_4h.bias"] = w(f, h), w(f)
        t[p + "mlp.dense_4h_to_h.weight"], t[p + "mlp.dense_4h_to_h.bias"] = w(h, f), w(h)
    t["ln_f.weight"], t["ln_f.bias"] = norm()
    return t


def build_random_bloom(
    folder: Path,
    hidden: int = 256,
    n_layer: int = 4,
    n_head: int = 4,
    vocab_size: int = 1024,
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    """Write a random BLOOM checkpoint (f16 safetensors + tokenizer.json) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bloom_tokenizer(SAMPLE_TEXT, vocab_size=vocab_size)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = bloom_config(vocab_size, hidden, n_layer, n_head)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(folder / "model.safetensors", random_bloom_weights(config, seed, std))
    return folder
