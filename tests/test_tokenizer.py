"""llama.cpp, reading the converted GGUF, tokenizes exactly like the Hugging Face tokenizer."""

from __future__ import annotations

import json

import pytest
from reference import make_bloom

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.synthetic import SAMPLE_TEXT, train_bloom_tokenizer

CORPUS = SAMPLE_TEXT + [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "Größenwahn, naïve café, façade, smørrebrød, Dvořák, Łódź, İstanbul, São Paulo.",
    "機械学習は人工知能の一分野です。深層学習、自然言語処理、画像認識。",
    "인공지능은 컴퓨터 과학의 한 분야입니다. 你好，世界！今天天气很好。",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product",
    "    if x is None:\n        raise ValueError(\"x\")\n\treturn {'k': [1, 2, 3]}",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ …and more… ¿¡",
    "Numbers 3.14159, 1,000,000 and 2026-11-29; e-mail: a.b@example.org; https://x.y/z?q=1",
    "हिन्दी में एक वाक्य। اردو میں ایک جملہ۔ العربية، جملة؟",
]

PROBES = [
    "Translate to English: Je t'aime.",
    "Ça coûte 12,50 € — très cher !",
    "über straße ÆØÅ æøå ñ ü",
    "東京都渋谷区。北京市，上海市、广州市",
    "🙂🙃 👩🏾‍💻 ✨🚀",
    "a  b   c    d",
    "trailing spaces   ",
    "   leading spaces",
    "\n\nnewlines\n\n\nand\r\nwindows\r\n",
    "tabs\tand\t\ttabs",
    "def f(x):\n    return x ** 2  # square\n",
    "Hindi। Urdu۔ Arabic، Ellipsis… done.",
    "unseen words: zyxwvut qqqq ǅ ʬ ᚠᛇᚻ",
    "x",
    " ",
    "end of text </s> then more",
]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tokenizer = train_bloom_tokenizer(CORPUS, vocab_size=1500)
    n = tokenizer.get_vocab_size()
    make_bloom(folder / "hf", vocab=n + 7, tokenizer=tokenizer)  # padded id space, as BLOOM's
    summary = convert(folder / "hf", folder / "tok.gguf", quant="f16")
    assert not summary.warnings
    model = pocketlm.load(summary.output, n_ctx=256)
    yield tokenizer, model
    model.close()


def test_pre_tokenizer_is_blooms(tokenized, tmp_path_factory):
    tokenizer, _ = tokenized
    pre = json.loads(tokenizer.to_str())["pre_tokenizer"]
    assert pre["pretokenizers"][0]["pattern"]["Regex"] == " ?[^(\\s|[.,!?…。，、।۔،])]+"


@pytest.mark.parametrize("text", PROBES + CORPUS)
def test_ids_match_hf_tokenizer(tokenized, text):
    tokenizer, model = tokenized
    assert model.tokenize(text) == tokenizer.encode(text).ids


@pytest.mark.parametrize("text", PROBES)
def test_detokenize_round_trips(tokenized, text):
    tokenizer, model = tokenized
    ids = model.tokenize(text)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert model.detokenize(ids) == expected


def test_transformers_tokenizer_agrees(tokenized, tmp_path):
    """The same tokenizer.json through transformers' fast tokenizer, as users load it."""
    from transformers import PreTrainedTokenizerFast

    tokenizer, model = tokenized
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in PROBES:
        assert model.tokenize(text) == hf(text)["input_ids"]


def test_special_ids_come_from_the_config(tokenized):
    _, model = tokenized
    assert model.engine.is_end(2)  # eos_token_id of the config
    assert not model.engine.is_end(5)


def test_no_tokenizer_converts_with_warning_and_runs_on_ids(tmp_path):
    make_bloom(tmp_path / "hf")
    summary = convert(tmp_path / "hf", tmp_path / "m.gguf", quant="f16")
    assert any("no tokenizer" in w for w in summary.warnings)
    with pocketlm.load(summary.output, n_ctx=64) as model:
        assert not model.info.has_tokenizer
        result = model.generate([5, 6, 7], max_new_tokens=4)
        assert len(result.token_ids) == 4 and result.text == ""
        with pytest.raises(pocketlm.PocketLMError, match="no tokenizer"):
            model.generate("text needs a tokenizer")
