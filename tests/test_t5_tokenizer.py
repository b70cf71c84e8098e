"""T5-family tokenization through the runtime equals the Hugging Face tokenizer's ids."""

from __future__ import annotations

import json

import pytest

import runtime
from convert import convert
from reference import T5_CORPUS, T5_PIECES, T5_PROBES, make_t5

CORPUS, PROBES, PIECES = T5_CORPUS, T5_PROBES, T5_PIECES


@pytest.fixture(scope="module", params=["tokenizer.json", "spiece.model"])
def model(request, tmp_path_factory, t5_tokenizer_files):
    folder = tmp_path_factory.mktemp(request.param.replace(".", "-"))
    vocab = PIECES + 100 + 20  # padded past the sentinels, as real T5 vocabularies are
    make_t5(folder / "hf", vocab=vocab, tokenizer_files={request.param: t5_tokenizer_files[request.param]})
    summary = convert(folder / "hf", folder / "ct2", quant="float32")
    assert not summary.warnings
    with runtime.load(summary.output) as m:
        yield m


@pytest.mark.parametrize("text", PROBES + CORPUS)
def test_ids_match_hf_t5_tokenizer(model, hf_t5_tokenizer, text):
    assert model.tokenize(text) == hf_t5_tokenizer(text)["input_ids"]


@pytest.mark.parametrize("text", PROBES)
def test_decode_matches_hf(model, hf_t5_tokenizer, text):
    ids = hf_t5_tokenizer(text)["input_ids"]
    assert model.detokenize(ids) == hf_t5_tokenizer.decode(ids, skip_special_tokens=True)


def test_sentinels_and_padding_ids(model, hf_t5_tokenizer):
    vocab = json.loads((runtime.loader.Path(model.info.path) / "shared_vocabulary.json").read_text())
    for i in (0, 50, 99):
        token = f"<extra_id_{i}>"
        assert vocab.index(token) == hf_t5_tokenizer.convert_tokens_to_ids(token) == PIECES + 99 - i
    assert len(vocab) == len(set(vocab)) == PIECES + 120
    assert vocab[:3] == ["<pad>", "</s>", "<unk>"]


def test_streamed_text_equals_generated_text(model):
    prompt = "Translate to English: Je t'aime."
    result = model.generate(prompt, max_new_tokens=30, repetition_penalty=1.3)
    assert "".join(model.stream(prompt, max_new_tokens=30, repetition_penalty=1.3)) == result.text
    assert result.text == model.detokenize([t for t in result.token_ids if t != 1])
