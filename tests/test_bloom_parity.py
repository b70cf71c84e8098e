"""BLOOM -> GGUF beyond the parity matrix (tests/test_parity.py runs the configs of
tests/parity.py's REFERENCES["bloom"] against transformers): large activations, and the
quant types' fallbacks for rows that do not fit a block."""

from __future__ import annotations

import pytest
from parity import REFERENCES, assert_close
from reference import hf_logits, make_bloom, random_ids

import pocketlm
from pocketlm.converters import convert


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
    assert_close(got, expected, 2e-3)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("config", list(REFERENCES["bloom"].configs))
def test_fallback_is_reported_for_rows_not_fitting_the_block(checkpoints, config):
    folder, _ = checkpoints.reference("bloom", config)
    summary = convert(folder / "hf", folder / "fallback-q4_k_m.gguf", quant="q4_k_m", force=True)
    matrices = [f for f in summary.fallbacks if f.tensor.startswith("blk.")]
    assert matrices, "hidden sizes here are not multiples of 256: fallbacks must be listed"
    assert all(f.used in ("f16", "q5_0", "q5_1", "q8_0", "q4_0") for f in summary.fallbacks)
    assert "instead of q4_k_m" in summary.describe()
