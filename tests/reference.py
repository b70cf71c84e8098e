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
        vocab_size=vocab, hidden_size=hidden, n_layer=n_layer, n_head=n_head,
        layer_norm_epsilon=eps, initializer_range=init, bos_token_id=1, eos_token_id=2, pad_token_id=3,
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
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False, num_beams=1, **kwargs,
        )
    return out[0, len(ids):].tolist()


def random_ids(n: int, vocab: int, seed: int = 0, low: int = 4) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(low, vocab, n)]
