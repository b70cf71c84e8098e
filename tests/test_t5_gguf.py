"""T5-family -> GGUF -> llama.cpp (encoder-decoder `t5`) matches transformers.

Same checkpoints as the CTranslate2 tests, converted with format="gguf" and run by
pocketlm.backends.llama_seq2seq on llama.cpp's C API.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference import T5_CORPUS, T5_PIECES, T5_PROBES, hf_seq2seq_greedy, hf_seq2seq_logits, make_t5, random_ids

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.errors import GenerationError, UnsupportedModelError
from pocketlm.converters.core.gguf_file import read_header

CONFIGS = {
    "t5-original-relu-tied-scaled": dict(ff="relu", head="tied-scaled"),
    "flan-t5-gated-untied-deeper-decoder": dict(ff="gated-gelu", head="untied", n_layers=2, n_dec=3),
    "deeper-encoder": dict(ff="gated-gelu", head="untied", n_layers=3, n_dec=2),
    "mt5-gated-untied": dict(model_type="mt5", ff="gated-gelu", head="untied", vocab=300),
    "t5v11-saved-by-transformers5": dict(ff="gated-gelu", head="tied-unscaled"),
    "dkv-x-heads-ne-dmodel": dict(d_model=72, d_kv=20, n_heads=3, d_ff=80, ff="relu", head="untied"),
    "bin-tied-scaled": dict(storage="bin", head="tied-scaled", ff="relu"),
    "sharded-bf16": dict(storage="sharded", dtype="bf16", head="untied"),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def t5(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_t5(folder / "hf", **CONFIGS[request.param])
    summary = convert(folder / "hf", folder / "model.gguf", format="gguf", quant="f32")
    model = pocketlm.load(summary.output, threads=2, parallel=1)
    yield ref, model
    model.close()


def test_f32_logits_match_transformers(t5):
    ref, model = t5
    vocab = ref.config.vocab_size
    worst = 0.0
    for seed in range(3):
        src = random_ids(45, vocab, seed) + [1]
        dec = [0] + random_ids(30, vocab, seed + 10)
        expected = hf_seq2seq_logits(ref, src, dec)
        got = model.logits(src, dec)
        assert got.shape == expected.shape == (len(dec), vocab) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
    print(f"\nf32 logits: max abs diff {worst:.1e} x max|logit|")
    assert worst <= 1e-3


def test_f32_greedy_equals_transformers(t5):
    ref, model = t5
    for seed in range(2):
        src = random_ids(10, ref.config.vocab_size, seed + 20) + [1]
        assert model.generate(src, max_new_tokens=24).token_ids == hf_seq2seq_greedy(ref, src, 24)
    # A strong repetition penalty walks through many tokens; it applies to decoder tokens only.
    expected = hf_seq2seq_greedy(ref, src, 24, repetition_penalty=5.0)
    assert model.generate(src, max_new_tokens=24, repetition_penalty=5.0).token_ids == expected
    assert len(set(expected)) >= 10


def test_score_is_the_target_log_likelihood(t5):
    ref, model = t5
    src = random_ids(8, ref.config.vocab_size, 30) + [1]
    cands = [[5, 6, 1], [7, 1]]
    for cand, score in zip(cands, model.score(src, cands)):
        logits = hf_seq2seq_logits(ref, src, [0] + cand).astype(np.float64)[: len(cand)]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        # each log-probability is off by at most twice the logits' error (1e-3 x max|logit|)
        tolerance = 2 * len(cand) * 1e-3 * np.abs(logits).max()
        assert score == pytest.approx(sum(logp[i, t] for i, t in enumerate(cand)), abs=tolerance)


def test_decoder_ids_must_start_with_the_start_token(t5):
    _, model = t5
    with pytest.raises(GenerationError, match="decoder start token"):
        model.logits([5, 1], [7, 8])
    assert model.logits([5, 1]).shape == (1, model.info.vocab_size)


def test_gguf_layout(tmp_path):
    """Depths are recorded (a deeper decoder pads the encoder with identity blocks, since
    llama.cpp cannot load it otherwise); a scaled tied head is its own tensor, an unscaled one is not."""
    make_t5(tmp_path / "deep-enc", ff="gated-gelu", head="untied", n_layers=3, n_dec=2)
    convert(tmp_path / "deep-enc", tmp_path / "deep-enc.gguf", format="gguf", quant="f32")
    header = read_header(tmp_path / "deep-enc.gguf")
    meta, names = header.metadata, {t.name for t in header.tensors}
    assert (meta["t5.block_count"], meta["t5.decoder_block_count"]) == (3, 2)
    assert (meta["t5.attention.relative_buckets_count"], meta["t5.decoder_start_token_id"]) == (32, 0)
    assert {"dec.blk.1.ffn_gate.weight", "output.weight", "enc.blk.0.attn_rel_b.weight"} <= names
    assert "enc.blk.1.attn_rel_b.weight" not in names and "dec.blk.0.cross_attn_rel_b.weight" not in names

    make_t5(tmp_path / "deep-dec", ff="gated-gelu", head="untied", n_layers=2, n_dec=3)
    summary = convert(tmp_path / "deep-dec", tmp_path / "deep-dec.gguf", format="gguf", quant="f32")
    header = read_header(tmp_path / "deep-dec.gguf")
    assert header.metadata["t5.block_count"] == 3 and "t5.decoder_block_count" not in header.metadata
    assert "enc.blk.2.ffn_gate.weight" in {t.name for t in header.tensors}
    assert any("1 identity blocks" in w for w in summary.warnings)
    for head, has_output in (("tied-scaled", True), ("tied-unscaled", False)):
        make_t5(tmp_path / head, ff="relu", head=head)
        convert(tmp_path / head, tmp_path / f"{head}.gguf", format="gguf", quant="f32")
        names = {t.name for t in read_header(tmp_path / f"{head}.gguf").tensors}
        assert ("output.weight" in names) == has_output and "enc.blk.0.ffn_gate.weight" not in names


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(buckets=16, max_distance=20), "relative_attention_max_distance=20"),
        (dict(ff="gated-silu"), "gated silu feed-forward"),
    ],
    ids=["max-distance-20", "gated-silu"],
)
def test_models_llama_cpp_would_run_wrong_are_refused(tmp_path, kwargs, message):
    make_t5(tmp_path / "hf", head="untied", **kwargs)
    with pytest.raises(UnsupportedModelError, match=message):
        convert(tmp_path / "hf", tmp_path / "m.gguf", format="gguf", quant="f32")
    assert not (tmp_path / "m.gguf").exists()
    convert(tmp_path / "hf", tmp_path / "ct2", format="ct2", quant="float32")  # CTranslate2 still takes it


# -- quantized files ---------------------------------------------------------------------

# Top-1 agreement with transformers and share of the greedy prefix kept, measured on this
# random d_model-256 model (deterministic): f16 1.000/1.00, q8_0 0.943/0.82, q4_k_m 0.698/0.38.
# q8_0 also rounds activations to 8 bits inside llama.cpp's matmuls.
QUANT_BOUNDS = {"f16": (0.98, 0.9), "q8_0": (0.9, 0.7), "q4_k_m": (0.6, 0.3)}


@pytest.fixture(scope="module")
def wide_t5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    ref = make_t5(folder / "hf", d_model=256, d_kv=64, n_heads=4, d_ff=512, vocab=256, head="untied")
    cases = []
    for seed in range(12):
        src, dec = random_ids(12, 256, seed) + [1], [0] + random_ids(15, 256, seed + 100)
        cases.append((src, dec, hf_seq2seq_logits(ref, src, dec).argmax(-1), hf_seq2seq_greedy(ref, src, 10)))
    return folder, cases


@pytest.mark.parametrize("quant", list(QUANT_BOUNDS))
def test_quantized_top1_agreement(wide_t5, quant):
    folder, cases = wide_t5
    summary = convert(folder / "hf", folder / f"{quant}.gguf", format="gguf", quant=quant)
    agree, kept = [], []
    with pocketlm.load(summary.output, threads=2, parallel=1) as model:
        assert model.info.quant == quant and model.info.format == "gguf" and model.info.architecture == "t5"
        for src, dec, top1, greedy in cases:
            agree.append(float((model.logits(src, dec).argmax(-1) == top1).mean()))
            got = model.generate(src, max_new_tokens=10).token_ids
            same = next((i for i, (a, b) in enumerate(zip(greedy, got)) if a != b), min(len(greedy), len(got)))
            kept.append(same / len(greedy))
    print(
        f"\n{quant}: top-1 agreement {np.mean(agree):.3f}, greedy prefix kept {np.mean(kept):.2f}, types "
        f"{summary.types}"
    )
    min_agree, min_kept = QUANT_BOUNDS[quant]
    assert np.mean(agree) >= min_agree and np.mean(kept) >= min_kept


# -- tokenizer ---------------------------------------------------------------------------

CORPUS, PROBES, PIECES = T5_CORPUS, T5_PROBES, T5_PIECES
# Where Hugging Face's tokenizers library and sentencepiece itself disagree, llama.cpp's UGM
# tokenizer follows sentencepiece: tokenizers normalizes whole grapheme clusters (a combining
# mark that composes with nothing vanishes with its base), and its WhitespaceSplit treats
# U+0085 as whitespace where sentencepiece's NMT-NFKC map leaves it (then <unk>).
SENTENCEPIECE_ONLY = ["\u0085 next line", "Ａ\u0301", "x \u2581\u0301a"]


def _hub_style(path, out):
    """The same tokenizer.json with the pre-tokenizer keys the Hub's T5 files use."""
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True},
        ],
    }
    out.write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module", params=["tokenizer.json", "hub-tokenizer.json", "spiece.model"])
def tok_model(request, tmp_path_factory, t5_tokenizer_files):
    folder = tmp_path_factory.mktemp(request.param.replace(".", "-"))
    name = "spiece.model" if request.param == "spiece.model" else "tokenizer.json"
    source = t5_tokenizer_files[name]
    if request.param == "hub-tokenizer.json":
        source = _hub_style(source, folder / "hub.json")
    make_t5(folder / "hf", vocab=PIECES + 100 + 20, tokenizer_files={name: source})  # padded past the sentinels
    summary = convert(folder / "hf", folder / "model.gguf", format="gguf", quant="f32")
    assert not summary.warnings
    with pocketlm.load(summary.output, threads=2, parallel=1) as model:
        yield model


def test_ids_and_text_match_hf_t5_tokenizer(tok_model, hf_t5_tokenizer):
    assert tok_model.info.has_tokenizer
    for text in PROBES + CORPUS:
        ids = hf_t5_tokenizer(text)["input_ids"]
        assert tok_model.tokenize(text) == ids, text
        assert tok_model.detokenize(ids) == hf_t5_tokenizer.decode(ids, skip_special_tokens=True), text


def test_llama_cpp_tokenizes_like_sentencepiece_where_hf_differs(tok_model, hf_t5_tokenizer, t5_tokenizer_files):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(t5_tokenizer_files["spiece.model"]))
    for text in SENTENCEPIECE_ONLY:
        ids = tok_model.tokenize(text)
        assert ids == sp.encode(text) + [1], text
        assert ids != hf_t5_tokenizer(text)["input_ids"], f"{text!r}: the documented difference is gone"


def test_replace_style_tokenizer_json_warns_about_trailing_spaces(tmp_path, t5_tokenizer_files):
    """tokenizer.json files that merge spaces with a Replace normalizer (no WhitespaceSplit) keep
    a trailing space as a '\u2581' token; llama.cpp, like sentencepiece, drops it: converted
    with a warning saying so."""
    import sentencepiece
    from transformers import PreTrainedTokenizerFast

    data = json.loads(t5_tokenizer_files["tokenizer.json"].read_text())
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [data["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}],
    }
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(t5_tokenizer_files["spiece.model"]))
    make_t5(tmp_path / "hf", vocab=PIECES + 100, tokenizer_files={"tokenizer.json": tmp_path / "tokenizer.json"})
    summary = convert(tmp_path / "hf", tmp_path / "m.gguf", format="gguf", quant="f32")
    assert any("trailing space" in w for w in summary.warnings)
    with pocketlm.load(summary.output, threads=2, parallel=1) as model:
        for text in ("Translate to English: Je t'aime.", "multiple   spaces\tand\nnewlines"):
            assert model.tokenize(text) == hf(text)["input_ids"]
        text = "trailing  "
        assert model.tokenize(text) == sp.encode(text) + [1] == hf(text)["input_ids"][:-2] + [1]


def test_sentinels_and_padding_ids(tok_model, hf_t5_tokenizer):
    for i in (0, 50, 99):
        token = f"<extra_id_{i}>"
        assert tok_model.tokenize(token) == [hf_t5_tokenizer.convert_tokens_to_ids(token), 1] == [PIECES + 99 - i, 1]
    assert tok_model.detokenize([PIECES + 100 + 5, 2, 0, 1]) == ""  # padding ids, <unk> and specials


def test_streamed_text_equals_generated_text(tok_model):
    prompt = "Translate to English: Je t'aime."
    result = tok_model.generate(prompt, max_new_tokens=30, repetition_penalty=1.3)
    assert "".join(tok_model.stream(prompt, max_new_tokens=30, repetition_penalty=1.3)) == result.text
    assert result.text == tok_model.detokenize(result.token_ids)
    assert len(result.token_ids) > 5 and result.text


def test_stream_keeps_sentencepiece_spaces(tok_model, hf_t5_tokenizer):
    """Streaming ids one by one gives HF's decode of the whole sequence (spaces included)."""
    ids = hf_t5_tokenizer("The <extra_id_0> house is wonderful. Größenwahn!")["input_ids"]
    detok = tok_model.engine.detokenizer()
    streamed = b"".join(detok.push(t) for t in ids) + detok.flush()
    assert streamed.decode() == hf_t5_tokenizer.decode(ids, skip_special_tokens=True)


def test_no_tokenizer_runs_on_ids(tmp_path):
    ref = make_t5(tmp_path / "hf", head="untied")
    summary = convert(tmp_path / "hf", tmp_path / "m.gguf", format="gguf", quant="f32")
    assert any("no tokenizer" in w for w in summary.warnings)
    with pocketlm.load(summary.output, threads=2, parallel=1) as model:
        assert not model.info.has_tokenizer and model.info.vocab_size == 160
        with pytest.raises(GenerationError, match="m.gguf has no tokenizer"):
            model.tokenize("hello")
        src = random_ids(10, 160, 1) + [1]
        result = model.generate(src, max_new_tokens=12)
        assert result.token_ids == hf_seq2seq_greedy(ref, src, 12) and result.text == ""
        assert model.engine.is_end(1) and not model.engine.is_end(0)
