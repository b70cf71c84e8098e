"""T5-family -> GGUF -> llama.cpp (encoder-decoder `t5`) beyond the parity matrix
(tests/test_parity.py runs the configs of tests/parity.py's REFERENCES["t5"] against
transformers, CTranslate2 and GGUF alike): the file's layout, the models refused, the
tokenizer in the file, a model without one.
"""

from __future__ import annotations

import json

import pytest
from reference import T5_CORPUS, T5_PIECES, T5_PROBES, hf_seq2seq_greedy, make_t5, random_ids

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.errors import GenerationError, UnsupportedModelError
from pocketlm.converters.core.gguf_file import read_header


def _load(path):
    return pocketlm.load(path, threads=2, parallel=1, backend="llama.cpp")


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
    with _load(summary.output) as model:
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
    with _load(summary.output) as model:
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
    streamed = tok_model.stream_tokens(prompt, max_new_tokens=30, repetition_penalty=1.3)
    assert "".join(event.text for event in streamed) == result.text
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
    with _load(summary.output) as model:
        assert not model.info.has_tokenizer and model.info.vocab_size == 160
        with pytest.raises(GenerationError, match="m.gguf has no tokenizer"):
            model.tokenize("hello")
        src = random_ids(10, 160, 1) + [1]
        result = model.generate(src, max_new_tokens=12)
        assert result.token_ids == hf_seq2seq_greedy(ref, src, 12) and result.text == ""
        assert model.engine.is_end(1) and not model.engine.is_end(0)
