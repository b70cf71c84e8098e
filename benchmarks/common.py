"""Shared by the benchmarks: real-shape random checkpoints (built once, cached) and a way to
measure a command's wall time and peak RSS in a child process.

Checkpoints use the published configs in ../shared/model_configs/ and random weights: the
shapes (and so the speed and memory) are real, the outputs are not. They are written tensor
by tensor, so building mt0-large (4.9 GB of float32) never holds it in memory.
"""

from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT.parent / "shared" / "model_configs"
CACHE = HERE / "results" / "cache"
RESULTS = HERE / "results"


def peak_rss(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, stdout) of a command run as a child process.

    The measuring process must stay small: Linux counts memory a child inherits at fork in
    the child's peak, so heavy work (building checkpoints) runs in children too."""
    with tempfile.TemporaryFile("w+") as errors:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = status
        seconds = time.perf_counter() - started
        if status:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({status}):\n{errors.read()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, out


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "system": platform.platform(), "python": platform.python_version()}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2) + "\n")
    return path


def config(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def write_safetensors_streaming(
    path: Path, shapes: dict[str, tuple[int, ...]], make: Callable[[str], np.ndarray], dtype: str
) -> None:
    """A safetensors file whose tensors are generated one at a time as they are written."""
    item = {"F32": 4, "F16": 2}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * item
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            f.write(make(name).astype({"F32": "<f4", "F16": "<f2"}[dtype]).reshape(shape).tobytes())
    tmp.rename(path)


def t5_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, inner, ff, v = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"], cfg["vocab_size"]
    gated = cfg.get("feed_forward_proj", "relu").startswith("gated")
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (v, d)}
    for stack, n in (("encoder", cfg["num_layers"]), ("decoder", cfg.get("num_decoder_layers") or cfg["num_layers"])):
        for i in range(n):
            p = f"{stack}.block.{i}.layer."
            attn = [(f"{p}0.SelfAttention", 0)] + ([(f"{p}1.EncDecAttention", 1)] if stack == "decoder" else [])
            for prefix, sub in attn:
                for w in "qkv":
                    shapes[f"{prefix}.{w}.weight"] = (inner, d)
                shapes[f"{prefix}.o.weight"] = (d, inner)
                shapes[f"{p}{sub}.layer_norm.weight"] = (d,)
            if i == 0:
                shapes[f"{p}0.SelfAttention.relative_attention_bias.weight"] = (
                    cfg["relative_attention_num_buckets"],
                    cfg["num_heads"],
                )
            f = f"{p}{2 if stack == 'decoder' else 1}"
            for w in ("wi_0", "wi_1") if gated else ("wi",):
                shapes[f"{f}.DenseReluDense.{w}.weight"] = (ff, d)
            shapes[f"{f}.DenseReluDense.wo.weight"] = (d, ff)
            shapes[f"{f}.layer_norm.weight"] = (d,)
        shapes[f"{stack}.final_layer_norm.weight"] = (d,)
    if cfg.get("tie_word_embeddings") is False:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def t5_tokenizer_json(vocab_size: int, path: Path) -> None:
    """A T5-style Unigram tokenizer.json: the real layout (pieces rounded down to hundreds,
    100 sentinels in reverse order, </s> appended), with made-up pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    n_extra = 100
    n_pieces = min(vocab_size - n_extra, vocab_size)
    n_pieces -= n_pieces % 100  # 32000 of 32128, 250000 of 250112, as the real ones
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁w{i}", -float(np.log(i + 2))) for i in range(n_pieces - 3)]
    pieces += [(f"<extra_id_{n_extra - 1 - j}>", 0.0) for j in range(n_extra)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(
        [AddedToken(t, special=True) for t, _ in pieces[:3]]
        + [AddedToken(t, special=True) for t, _ in pieces[-n_extra:]]
    )
    tok.save(str(path))


def t5_checkpoint(name: str) -> Path:
    """A random checkpoint of ../shared/model_configs/<name>.json (T5 family), cached."""
    folder = CACHE / f"{name}-shape"
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config(name)
    rng = np.random.default_rng(0)

    d, d_kv = cfg["d_model"], cfg["d_kv"]

    def std(tensor: str, shape: tuple[int, ...]) -> float:
        """transformers' T5 initialisation: T5 does not scale attention scores, so queries
        start (d_model * d_kv)**-0.5 small; embeddings and the head start at 1."""
        if tensor in ("shared.weight", "lm_head.weight"):
            return 1.0
        if tensor.endswith(".q.weight"):
            return (d * d_kv) ** -0.5
        return shape[-1] ** -0.5  # k, v, o, wi, wo, relative bias: fan-in

    def make(tensor: str) -> np.ndarray:
        shape = shapes[tensor]
        if tensor.endswith("layer_norm.weight"):
            return np.ones(shape, np.float32)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std(tensor, shape))

    shapes = t5_shapes(cfg)
    t5_tokenizer_json(cfg["vocab_size"], folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5TokenizerFast", "extra_ids": 100}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_safetensors_streaming(folder / "model.safetensors", shapes, make, "F32")
    return folder


def bloom_checkpoint(name: str = "bloomz-560m") -> Path:
    folder = CACHE / f"{name}-shape"
    if (folder / "model.safetensors").is_file():
        return folder
    from pocketlm.converters.synthetic import SAMPLE_TEXT, random_bloom_weights, train_bloom_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    cfg = config(name)
    train_bloom_tokenizer(SAMPLE_TEXT, 1024).save(str(folder / "tokenizer.json"))
    weights = random_bloom_weights(cfg)
    write_safetensors_streaming(
        folder / "model.safetensors", {k: v.shape for k, v in weights.items()}, weights.__getitem__, "F16"
    )
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


BUILDERS = {
    "bloomz-560m": bloom_checkpoint,
    "flan-t5-small": t5_checkpoint,
    "mt0-large": t5_checkpoint,
    "T0pp": t5_checkpoint,
}


def ensure_checkpoint(name: str) -> Path:
    """Build (in a child process, see peak_rss) and return the cached checkpoint for `name`."""
    folder = CACHE / f"{name}-shape"
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(HERE / "common.py"), name], check=True)
    return folder


if __name__ == "__main__":
    BUILDERS[sys.argv[1]](sys.argv[1])
