"""T5-family tokenization through the runtime equals the Hugging Face tokenizer's ids."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from reference import T5_CORPUS, T5_PIECES, T5_PROBES, make_t5

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.sentencepiece import read_spm_model, t5_tokenizer

CORPUS, PROBES, PIECES = T5_CORPUS, T5_PROBES, T5_PIECES


@pytest.fixture(scope="module", params=["tokenizer.json", "spiece.model"])
def model(request, tmp_path_factory, t5_tokenizer_files):
    folder = tmp_path_factory.mktemp(request.param.replace(".", "-"))
    vocab = PIECES + 100 + 20  # padded past the sentinels, as real T5 vocabularies are
    make_t5(folder / "hf", vocab=vocab, tokenizer_files={request.param: t5_tokenizer_files[request.param]})
    summary = convert(folder / "hf", folder / "ct2", quant="float32")
    assert not summary.warnings
    with pocketlm.load(summary.output) as m:
        yield m


@pytest.mark.parametrize("text", PROBES + CORPUS)
def test_ids_match_hf_t5_tokenizer(model, hf_t5_tokenizer, text):
    assert model.tokenize(text) == hf_t5_tokenizer(text)["input_ids"]


@pytest.mark.parametrize("text", PROBES)
def test_decode_matches_hf(model, hf_t5_tokenizer, text):
    ids = hf_t5_tokenizer(text)["input_ids"]
    assert model.detokenize(ids) == hf_t5_tokenizer.decode(ids, skip_special_tokens=True)


def test_sentinels_and_padding_ids(model, hf_t5_tokenizer):
    vocab = json.loads((pocketlm.loading.load.Path(model.info.path) / "shared_vocabulary.json").read_text())
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


# -- spiece.model without the sentencepiece library ----------------------------------------

T5_SPECIAL_TEXT = re.compile(r"(<extra_id_\d+>|</s>|<unk>|<pad>)")
# Inputs where Hugging Face's fast tokenizer and sentencepiece itself differ (see test_t5_gguf.py):
# tokenizers drops a combining mark that composes with nothing together with its base, and its
# WhitespaceSplit splits at U+0085. The tokenizer built from spiece.model follows Hugging Face.
HF_NOT_SENTENCEPIECE = ["\u0085 next line", "\uff21\u0301", "x \u2581\u0301a"]


@pytest.fixture(scope="module")
def spiece_only(tmp_path_factory, t5_tokenizer_files):
    """A CTranslate2 folder converted from a checkpoint whose only tokenizer file is spiece.model."""
    folder = tmp_path_factory.mktemp("spiece-only")
    spiece = t5_tokenizer_files["spiece.model"]
    make_t5(folder / "hf", vocab=PIECES + 100 + 20, tokenizer_files={"spiece.model": spiece})
    return Path(convert(folder / "hf", folder / "ct2", quant="float32").output)


def _sentencepiece_ids(sp, hf_t5_tokenizer, text):
    """sentencepiece's ids plus </s>. sentencepiece knows nothing of T5's added tokens (the
    sentinels, and </s>, <unk>, <pad> written in the text): those are matched first, as
    transformers does, and the text between them is encoded by sentencepiece."""
    ids = []
    for i, part in enumerate(T5_SPECIAL_TEXT.split(text)):
        ids += [hf_t5_tokenizer.convert_tokens_to_ids(part)] if i % 2 else sp.encode(part)
    return ids + [hf_t5_tokenizer.convert_tokens_to_ids("</s>")]


def test_spiece_only_folder_ships_a_built_tokenizer_json(spiece_only, t5_tokenizer_files):
    info = json.loads((spiece_only / "pocketlm.json").read_text())
    assert info["tokenizer"] == "tokenizer.json"
    assert not (spiece_only / "spiece.model").exists()
    # exactly the tokenizer.json transformers writes for the same spiece.model
    built = json.loads((spiece_only / "tokenizer.json").read_text())
    assert built == json.loads(t5_tokenizer_files["tokenizer.json"].read_text())


def test_built_tokenizer_matches_sentencepiece(t5_tokenizer_files, hf_t5_tokenizer):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(t5_tokenizer_files["spiece.model"]))
    spm = read_spm_model(t5_tokenizer_files["spiece.model"])
    tok = t5_tokenizer(spm, PIECES + 100 + 20)
    for text in CORPUS + PROBES:
        assert tok.encode(text).ids == _sentencepiece_ids(sp, hf_t5_tokenizer, text), text
    for text in HF_NOT_SENTENCEPIECE:  # the reference is Hugging Face's tokenizer here
        assert tok.encode(text).ids == hf_t5_tokenizer(text)["input_ids"] != sp.encode(text) + [1], text


def test_folder_naming_spiece_model_still_tokenizes_like_hf(spiece_only, tmp_path, t5_tokenizer_files, hf_t5_tokenizer):
    """Folders converted before tokenizer.json was built from spiece.model name spiece.model."""
    old = tmp_path / "old"
    shutil.copytree(spiece_only, old)
    shutil.copy(t5_tokenizer_files["spiece.model"], old / "spiece.model")
    (old / "tokenizer.json").unlink()
    info = json.loads((old / "pocketlm.json").read_text())
    (old / "pocketlm.json").write_text(json.dumps({**info, "tokenizer": "spiece.model"}))
    with pocketlm.load(old) as m:
        for text in PROBES + CORPUS:
            ids = hf_t5_tokenizer(text)["input_ids"]
            assert m.tokenize(text) == ids, text
            assert m.detokenize(ids) == hf_t5_tokenizer.decode(ids, skip_special_tokens=True), text
