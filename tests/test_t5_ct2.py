"""T5-family -> CTranslate2 matches transformers on the same token ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference import hf_seq2seq_greedy, hf_seq2seq_logits, make_t5, random_ids

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.ct2_file import read_model_bin
from pocketlm.converters.core.errors import GenerationError
from pocketlm.converters.core.formats import CT2_QUANTS as QUANT_TYPES

CONFIGS = {
    "t5-original-relu-tied-scaled": dict(ff="relu", head="tied-scaled"),
    "flan-t5-gated-untied-asym": dict(ff="gated-gelu", head="untied", n_layers=2, n_dec=3),
    "mt5-gated-untied": dict(model_type="mt5", ff="gated-gelu", head="untied", vocab=300),
    "t5v11-saved-by-transformers5": dict(ff="gated-gelu", head="tied-unscaled"),
    "dkv-x-heads-ne-dmodel": dict(d_model=72, d_kv=20, n_heads=3, d_ff=80, ff="relu", head="untied"),
    "buckets16-distance20": dict(buckets=16, max_distance=20, head="untied"),
    "bin-f16": dict(storage="bin", dtype="f16", head="untied"),
    "bin-sharded-tied": dict(storage="bin-sharded", head="tied-scaled", ff="relu"),
    "sharded-bf16": dict(storage="sharded", dtype="bf16", head="untied"),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def t5(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_t5(folder / "hf", **CONFIGS[request.param])
    summary = convert(folder / "hf", folder / "ct2", quant="float32")
    model = pocketlm.load(summary.output)
    yield ref, model
    model.close()


def test_float32_logits_match_transformers(t5):
    ref, model = t5
    vocab = ref.config.vocab_size
    for seed in range(3):
        src = random_ids(45, vocab, seed) + [1]  # longer than max_distance in one config
        dec = [0] + random_ids(30, vocab, seed + 10)
        expected = hf_seq2seq_logits(ref, src, dec)
        got = model.logits(src, dec)
        assert got.shape == expected.shape == (len(dec), vocab) and got.dtype == np.float32
        err = np.abs(got - expected).max() / np.abs(expected).max()
        assert err <= 1e-3, f"max abs diff {err:.2e} x max|logit|"


def test_float32_greedy_equals_transformers(t5):
    ref, model = t5
    for seed in range(3):
        src = random_ids(10, ref.config.vocab_size, seed + 20) + [1]
        expected = hf_seq2seq_greedy(ref, src, 24)
        assert model.generate(src, max_new_tokens=24).token_ids == expected


def test_batch_generation_equals_one_by_one(t5):
    _, model = t5
    prompts = [random_ids(n, model.info.vocab_size, n) + [1] for n in (4, 9, 15)]
    batch = model.generate(prompts, max_new_tokens=12)
    assert [r.token_ids for r in batch] == [model.generate(p, max_new_tokens=12).token_ids for p in prompts]


def test_score_is_the_target_log_likelihood(t5):
    ref, model = t5
    src = random_ids(8, ref.config.vocab_size, 30) + [1]
    cands = [[5, 6, 1], [7, 1]]
    scores = model.score(src, cands)
    for cand, score in zip(cands, scores):
        logits = hf_seq2seq_logits(ref, src, [0] + cand).astype(np.float64)[: len(cand)]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        assert score == pytest.approx(sum(logp[i, t] for i, t in enumerate(cand)), abs=1e-3)


def test_decoder_ids_must_start_with_the_start_token(t5):
    _, model = t5
    with pytest.raises(GenerationError, match="decoder start token"):
        model.logits([5, 1], [7, 8])


@pytest.fixture(scope="module")
def wide_t5(tmp_path_factory):
    """d_model 256: per-row int8 has realistic room (tiny widths exaggerate rounding)."""
    folder = tmp_path_factory.mktemp("wide")
    ref = make_t5(folder / "hf", d_model=256, d_kv=64, n_heads=4, d_ff=512, vocab=256, head="untied")
    return folder, ref


def _agreement(ref, model, n=12):
    agree, greedy = [], []
    for seed in range(n):
        src = random_ids(12, 256, seed) + [1]
        dec = [0] + random_ids(15, 256, seed + 100)
        agree.append(float((hf_seq2seq_logits(ref, src, dec).argmax(-1) == model.logits(src, dec).argmax(-1)).mean()))
        expected = hf_seq2seq_greedy(ref, src, 10)
        got = model.generate(src, max_new_tokens=10).token_ids
        same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        greedy.append(same / max(len(expected), 1))
    return float(np.mean(agree)), float(np.mean(greedy))


def test_int8_top1_agreement(wide_t5):
    folder, ref = wide_t5
    summary = convert(folder / "hf", folder / "int8", quant="int8")
    variables, aliases = read_model_bin(folder / "int8" / "model.bin")
    assert variables["decoder/projection/weight"][0] == "int8" and "decoder/projection/weight_scale" in variables
    # The converted int8 weights, computed in float32: the conversion's own error.
    with pocketlm.load(summary.output, compute_type="float32") as model:
        weights_agree, weights_greedy = _agreement(ref, model)
    # The runtime's default on CPU for int8 models: int8 compute also quantizes activations.
    with pocketlm.load(summary.output) as model:
        assert model.info.quant == "int8" and any("compute type int8" in r for r in model.info.reasons)
        compute_agree, compute_greedy = _agreement(ref, model)
    print(
        f"\nint8 weights/float32 compute: top-1 {weights_agree:.3f}, greedy prefix kept {weights_greedy:.2f}; "
        f"int8 compute: top-1 {compute_agree:.3f}, greedy prefix kept {compute_greedy:.2f}"
    )
    assert weights_agree >= 0.95
    assert compute_agree >= 0.85  # CTranslate2's dynamic activation quantization on a random model
    assert weights_greedy >= 0.5 and compute_greedy >= 0.3


@pytest.mark.parametrize("quant", [q for q in QUANT_TYPES if q != "float32"])
def test_every_quant_type_converts_loads_and_runs(wide_t5, quant):
    folder, ref = wide_t5
    summary = convert(folder / "hf", folder / f"q-{quant}", quant=quant)
    variables, _ = read_model_bin(folder / f"q-{quant}" / "model.bin")
    head_dtype = variables["decoder/projection/weight"][0]
    assert head_dtype == {"int16": "int16", "float16": "float16", "bfloat16": "bfloat16"}.get(quant, "int8")
    with pocketlm.load(summary.output) as model:
        src = random_ids(12, 256, 7) + [1]
        assert len(model.generate(src, max_new_tokens=6).token_ids) == 6
        dec = [0] + random_ids(15, 256, 8)
        agree = float((hf_seq2seq_logits(ref, src, dec).argmax(-1) == model.logits(src, dec).argmax(-1)).mean())
    assert agree >= 0.75, f"{quant}: top-1 agreement {agree:.2f}"


def test_tied_embeddings_are_written_once(tmp_path):
    make_t5(tmp_path / "hf", head="tied-scaled", ff="relu")
    convert(tmp_path / "hf", tmp_path / "ct2", quant="int8")
    variables, aliases = read_model_bin(tmp_path / "ct2" / "model.bin")
    assert aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert aliases["encoder/embeddings_0/weight"] == "decoder/embeddings/weight"
    assert "decoder/scale_outputs" in variables
    assert (
        aliases["encoder/layer_1/self_attention/relative_attention_bias"]
        == "encoder/layer_0/self_attention/relative_attention_bias"
    )


def test_default_format_is_ct2_int8_and_metadata_is_written(tmp_path):
    make_t5(tmp_path / "hf", head="untied")
    summary = convert(tmp_path / "hf", tmp_path / "out")
    assert (summary.format, summary.quant) == ("ct2", "int8")
    meta = json.loads((tmp_path / "out" / "pocketlm.json").read_text())
    assert meta["converter"] == "pocketlm" and meta["quant"] == "int8" and meta["architecture"] == "t5"
    assert set(meta["source"]["files"]) >= {"config.json", "model.safetensors"}
    assert (meta["decoder_start_token_id"], meta["eos_token_id"]) == (0, 1)
    assert any("no tokenizer" in w for w in summary.warnings)
    vocab = json.loads((tmp_path / "out" / "shared_vocabulary.json").read_text())
    assert len(vocab) == len(set(vocab)) == 160


def test_interrupted_ct2_conversion_leaves_nothing(tmp_path, monkeypatch):
    import pocketlm.converters.ct2_target as ct2_target

    make_t5(tmp_path / "hf", head="untied")
    calls = {"n": 0}
    real = ct2_target._int8_rows

    def flaky(rows):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(rows)

    monkeypatch.setattr(ct2_target, "_int8_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "hf", tmp_path / "out", quant="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
