"""BLOOM -> GGUF -> llama.cpp matches transformers on the same token ids."""

from __future__ import annotations

import numpy as np
import pytest
from reference import hf_greedy, hf_logits, make_bloom, random_ids

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.formats import GGUF_QUANTS as QUANT_TYPES

# (name, make_bloom kwargs): odd widths, 5 heads, eps 1e-6, every storage layout and dtype.
SHAPES = {
    "h80-5heads-safetensors": dict(hidden=80, n_head=5, n_layer=2, eps=1e-6),
    "h96-3heads-sharded": dict(hidden=96, n_head=3, n_layer=3, storage="sharded"),
    "h64-4heads-bin": dict(hidden=64, n_head=4, n_layer=2, storage="bin"),
    "h40-5heads-bin-sharded": dict(hidden=40, n_head=5, n_layer=3, storage="bin-sharded", vocab=257),
    "h80-bf16": dict(hidden=80, n_head=5, dtype="bf16"),
    "h80-f16-bin": dict(hidden=80, n_head=5, dtype="f16", storage="bin"),
}


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def bloom(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_bloom(folder / "hf", **SHAPES[request.param])
    return folder, ref


def _convert_and_load(folder, quant):
    out = folder / f"model-{quant}.gguf"
    if not out.exists():
        convert(folder / "hf", out, quant=quant)
    return pocketlm.load(out, n_ctx=256)


def test_f32_logits_match_transformers(bloom):
    folder, ref = bloom
    ids = random_ids(48, ref.config.vocab_size)
    expected = hf_logits(ref, ids)
    with _convert_and_load(folder, "f32") as model:
        got = model.logits(ids)
    assert got.shape == expected.shape and got.dtype == np.float32
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= 1e-4, f"max abs diff {err:.2e} x max|logit|"


def test_f32_greedy_equals_transformers_generate(bloom):
    folder, ref = bloom
    prompt = random_ids(12, ref.config.vocab_size, seed=1)
    with _convert_and_load(folder, "f32") as model:
        assert model.generate(prompt, max_new_tokens=40).token_ids == hf_greedy(ref, prompt, 40)
        # Random BLOOMs tend to repeat one token; a strong repetition penalty (same rule as
        # transformers) makes the greedy path visit many different tokens.
        expected = hf_greedy(ref, prompt, 40, repetition_penalty=10.0)
        got = model.generate(prompt, max_new_tokens=40, repetition_penalty=10.0)
    assert got.token_ids == expected
    assert len(set(expected)) >= 20, "degenerate reference: the test would prove little"


def test_f32_parity_with_large_activations(tmp_path):
    """Weights 15x the usual scale. llama.cpp's CPU GELU reads an fp16 table (ggml-cpu
    vec.h, GGML_GELU_FP16), so f32 parity is bounded by that rounding here, not by the
    converter: 2e-3 still catches any layout error (a swapped q/k/v gives O(1) errors)."""
    ref = make_bloom(tmp_path / "hf", init=0.3)
    ids = random_ids(48, ref.config.vocab_size, seed=5)
    expected = hf_logits(ref, ids)
    convert(tmp_path / "hf", tmp_path / "m.gguf", quant="f32")
    with pocketlm.load(tmp_path / "m.gguf", n_ctx=256) as model:
        got = model.logits(ids)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 2e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_f16_within_one_percent(bloom):
    folder, ref = bloom
    ids = random_ids(48, ref.config.vocab_size, seed=2)
    expected = hf_logits(ref, ids)
    with _convert_and_load(folder, "f16") as model:
        got = model.logits(ids)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-2


@pytest.fixture(scope="module")
def bloom_256(tmp_path_factory):
    """Rows of 256: every block size fits, so each quant type is really applied."""
    folder = tmp_path_factory.mktemp("h256")
    ref = make_bloom(folder / "hf", hidden=256, n_head=4, n_layer=2, vocab=512, init=0.05)
    return folder, ref


def test_q8_0_top1_agreement(bloom_256):
    folder, ref = bloom_256
    ids = random_ids(200, ref.config.vocab_size, seed=3)
    expected = hf_logits(ref, ids)
    with _convert_and_load(folder, "q8_0") as model:
        got = model.logits(ids)
    agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
    assert agreement >= 0.98, f"top-1 agreement {agreement:.3f}"


@pytest.mark.parametrize("quant", [q for q in QUANT_TYPES if q not in ("f32", "f16")])
def test_every_quant_type_converts_loads_and_generates(bloom_256, quant):
    folder, ref = bloom_256
    summary = convert(folder / "hf", folder / f"all-{quant}.gguf", quant=quant)
    assert summary.quant == quant and not summary.fallbacks
    main_type = quant[:4] if "_k" in quant else quant  # q4_k_m is mostly q4_k tensors
    assert main_type in summary.types, summary.types
    with pocketlm.load(summary.output, n_ctx=128) as model:
        assert model.info.quant == quant
        result = model.generate(random_ids(8, 512), max_new_tokens=8)
        assert len(result.token_ids) == 8 and result.finish_reason == "length"
        ids = random_ids(64, 512, seed=4)
        expected = hf_logits(ref, ids)
        agreement = float((model.logits(ids).argmax(-1) == expected.argmax(-1)).mean())
    assert agreement >= 0.5, f"{quant}: top-1 agreement {agreement:.2f} (the model is broken, not just quantized)"


def test_fallback_is_reported_for_rows_not_fitting_the_block(bloom):
    folder, _ = bloom
    summary = convert(folder / "hf", folder / "fallback-q4_k_m.gguf", quant="q4_k_m", force=True)
    matrices = [f for f in summary.fallbacks if f.tensor.startswith("blk.")]
    assert matrices, "hidden sizes here are not multiples of 256: fallbacks must be listed"
    assert all(f.used in ("f16", "q5_0", "q5_1", "q8_0", "q4_0") for f in summary.fallbacks)
    assert "instead of q4_k_m" in summary.describe()
