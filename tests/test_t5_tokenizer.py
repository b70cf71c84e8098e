"""T5-family tokenization through the runtime equals the Hugging Face tokenizer's ids."""

from __future__ import annotations

import json

import pytest

import runtime
from convert import convert
from convert.synthetic import SAMPLE_TEXT
from reference import make_t5, make_t5_tokenizer

CORPUS = SAMPLE_TEXT + [
    "Translate English to German: The house is wonderful.",
    "Question: What is the capital of France? Answer: Paris.",
    "Größenwahn, naïve café, façade, smørrebrød, Dvořák, São Paulo.",
    "機械学習は人工知能の一分野です。深層学習と自然言語処理。",
    "Review: this movie was great! Is this review positive or negative?",
]
PROBES = [
    "Translate to English: Je t'aime.",
    "summarize: The quick brown fox jumps over the lazy dog.",
    "Größe über alles — très bien !",
    "東京都。北京市，上海市",
    "emoji 🙂 and unseen ǅʬ letters",
    "multiple   spaces\tand\nnewlines",
    "The <extra_id_0> walks in <extra_id_1> park.",
    "x",
]
PIECES = 180


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    return make_t5_tokenizer(tmp_path_factory.mktemp("spm"), CORPUS, pieces=PIECES)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_files):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_files["tokenizer.json"]))


@pytest.fixture(scope="module", params=["tokenizer.json", "spiece.model"])
def model(request, tmp_path_factory, tokenizer_files):
    folder = tmp_path_factory.mktemp(request.param.replace(".", "-"))
    vocab = PIECES + 100 + 20  # padded past the sentinels, as real T5 vocabularies are
    make_t5(folder / "hf", vocab=vocab, tokenizer_files={request.param: tokenizer_files[request.param]})
    summary = convert(folder / "hf", folder / "ct2", quant="float32")
    assert not summary.warnings
    with runtime.load(summary.output) as m:
        yield m


@pytest.mark.parametrize("text", PROBES + CORPUS)
def test_ids_match_hf_tokenizer(model, hf_tokenizer, text):
    assert model.tokenize(text) == hf_tokenizer(text)["input_ids"]


@pytest.mark.parametrize("text", PROBES)
def test_decode_matches_hf(model, hf_tokenizer, text):
    ids = hf_tokenizer(text)["input_ids"]
    assert model.detokenize(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_sentinels_and_padding_ids(model, hf_tokenizer):
    vocab = json.loads((runtime.loader.Path(model.info.path) / "shared_vocabulary.json").read_text())
    for i in (0, 50, 99):
        token = f"<extra_id_{i}>"
        assert vocab.index(token) == hf_tokenizer.convert_tokens_to_ids(token) == PIECES + 99 - i
    assert len(vocab) == len(set(vocab)) == PIECES + 120
    assert vocab[:3] == ["<pad>", "</s>", "<unk>"]


def test_streamed_text_equals_generated_text(model):
    prompt = "Translate to English: Je t'aime."
    result = model.generate(prompt, max_new_tokens=30, repetition_penalty=1.3)
    assert "".join(model.stream(prompt, max_new_tokens=30, repetition_penalty=1.3)) == result.text
    assert result.text == model.detokenize([t for t in result.token_ids if t != 1])
