"""Every byte-level BPE pre-tokenizer the converter accepts loads in llama.cpp and tokenizes as
`tokenizers` does; every other one is refused in one line before anything is written.

For each accepted form (the plain GPT-2 `ByteLevel`, and `Split(regex) + ByteLevel` for each
regex in the converter's table) a small BPE is trained with that pre-tokenizer, saved beside a
tiny random BLOOM, converted to GGUF and loaded through `pocketlm.load` (the runtime's llama.cpp
settings); llama.cpp's ids must equal the `tokenizers` ids on mixed-script text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest
from reference import make_bloom

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.errors import UnsupportedModelError
from pocketlm.converters.synthetic import SAMPLE_TEXT, SPECIAL_TOKENS
from pocketlm.converters.vocab import GPT2_SPLIT_REGEX, PRE_TOKENIZER_BY_REGEX

TEXTS = [
    "Don't stop: we're sure it's what they'd've said. I'll go, you've seen, she'd, we'll.",
    "DON'T SHOUT, It'S fine; 'tis the season, 'quoted' words and O'Brien's café.",
    "Größenwahn, naïve café, façade, smørrebrød, Dvořák, Łódź, İstanbul, São Paulo, crème brûlée.",
    "combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ (composed)",
    "機械学習は人工知能の一分野です。深層学習、自然言語処理、画像認識。你好，世界！",
    "인공지능은 컴퓨터 과학의 한 분야입니다. ภาษาไทยไม่มีช่องว่าง",
    "مرحبا بالعالم، كيف حالك؟ العربية: ١٢٣٤٥ و 2026. שלום עולם",
    "हिन्दी में एक वाक्य। اردو میں ایک جملہ۔ Привет, мир! Ελληνικά.",
    "digits 1234567890 3.14159 1,000,000 2026-11-29 ½ ² ³ 0x1F 007 12345678901234567890",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🙂🙃 👩🏾‍💻 ✨🚀 …and more… ¿¡",
    "a  b   c    d     e      f",
    "   leading spaces and trailing spaces   ",
    "\n\nnewlines\n\n\nand\r\nwindows\r\n\ttabs\t\tand \t mixed \n ",
    "def f(x):\n    return x ** 2  # square\n\nif x is None:\n\traise ValueError('x')\n",
    "unseen: zyxwvut qqqq ǅ ʬ ᚠᛇᚻ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 Ⅻ ⅻ",
    "end of text </s> then <s> more <pad> <unk>",
    "x",
    " ",
    "",
]

# Each accepted pre-tokenizer, as it appears in tokenizer.json, by a readable test id.
ACCEPTED: dict[str, dict[str, Any]] = {
    "ByteLevel": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "Sequence[ByteLevel]": {
        "type": "Sequence",
        "pretokenizers": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
    },
}
for _regex, _name in PRE_TOKENIZER_BY_REGEX.items():
    ACCEPTED[f"Split[{_name}]+ByteLevel"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }

_BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
# Pre-tokenizers llama.cpp has no equivalent for (with the word the refusal must name).
REFUSED: dict[str, tuple[Any, str]] = {
    "none": (None, "none"),
    "Whitespace": ({"type": "Whitespace"}, "Whitespace"),
    "Metaspace": ({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}, "Metaspace"),
    "ByteLevel-prefix-space": (
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "add_prefix_space=True",
    ),
    "ByteLevel-no-regex": (_BYTE_LEVEL_NO_REGEX, "ByteLevel"),
    "Split-unknown-regex": (
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\w+|[^\\w\\s]+"}, "behavior": "Isolated", "invert": False},
                _BYTE_LEVEL_NO_REGEX,
            ],
        },
        "\\\\w+|[^\\\\w\\\\s]+",
    ),
    "Split-gpt2-removed": (
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": GPT2_SPLIT_REGEX}, "behavior": "Removed", "invert": False},
                _BYTE_LEVEL_NO_REGEX,
            ],
        },
        "Removed",
    ),
    "Digits+ByteLevel": (
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "Digits",
    ),
}


def train(pre_tokenizer: dict[str, Any] | None) -> Any:
    """A byte-level BPE trained on the texts with the given tokenizer.json pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.ByteLevel()
    data = json.loads(tok.to_str())
    data["pre_tokenizer"] = pre_tokenizer
    tok = Tokenizer.from_str(json.dumps(data))
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SAMPLE_TEXT + TEXTS, trainer=trainer)
    return tok


@pytest.fixture(scope="module", params=list(ACCEPTED), ids=list(ACCEPTED))
def converted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pre")
    tokenizer = train(ACCEPTED[request.param])
    assert json.loads(tokenizer.to_str())["pre_tokenizer"] == ACCEPTED[request.param]
    make_bloom(folder / "hf", vocab=tokenizer.get_vocab_size() + 5, tokenizer=tokenizer)
    summary = convert(folder / "hf", folder / "m.gguf", quant="f16")
    assert not summary.warnings
    model = pocketlm.load(summary.output, n_ctx=512)
    yield tokenizer, model
    model.close()


def test_accepted_forms_cover_every_llama_cpp_name():
    """Each name the converter can write is exercised by a case below (and so loaded by llama.cpp)."""
    covered = {name for name in PRE_TOKENIZER_BY_REGEX.values() if f"Split[{name}]+ByteLevel" in ACCEPTED}
    assert covered == set(PRE_TOKENIZER_BY_REGEX.values())
    assert PRE_TOKENIZER_BY_REGEX[GPT2_SPLIT_REGEX] in covered


def test_llama_cpp_tokenizes_as_tokenizers(converted):
    tokenizer, model = converted
    mismatches = {text: (model.tokenize(text), tokenizer.encode(text).ids) for text in TEXTS}
    mismatches = {text: ids for text, ids in mismatches.items() if ids[0] != ids[1]}
    assert not mismatches


def test_whole_corpus_at_once(converted):
    """All the texts joined: pre-tokenizer splits across script and whitespace boundaries."""
    tokenizer, model = converted
    text = "\n".join(TEXTS) + "  \n"
    assert model.tokenize(text) == tokenizer.encode(text).ids


def test_detokenize_round_trips(converted):
    tokenizer, model = converted
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert model.detokenize(ids) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def bloom_folder(tmp_path_factory):
    """A converted-ready BLOOM whose tokenizer.json each refusal case rewrites."""
    folder = tmp_path_factory.mktemp("refused") / "hf"
    tokenizer = train(ACCEPTED["ByteLevel"])
    make_bloom(folder, vocab=tokenizer.get_vocab_size(), tokenizer=tokenizer)
    return folder


def _with_tokenizer(bloom_folder, tmp_path, edit) -> Any:
    folder = tmp_path / "hf"
    shutil.copytree(bloom_folder, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("case", list(REFUSED))
def test_unknown_pre_tokenizer_is_refused_in_one_line(bloom_folder, tmp_path, case):
    pre, says = REFUSED[case]
    folder = _with_tokenizer(bloom_folder, tmp_path, lambda d: d.update(pre_tokenizer=pre))
    with pytest.raises(UnsupportedModelError) as error:
        convert(folder, tmp_path / "m.gguf", quant="f16")
    message = str(error.value)
    assert "\n" not in message
    assert str(folder / "tokenizer.json") in message and "pre-tokenizer" in message and says in message
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("option, value", [("ignore_merges", True), ("dropout", 0.1), ("byte_fallback", True)])
def test_bpe_options_llama_cpp_lacks_are_refused(bloom_folder, tmp_path, option, value):
    folder = _with_tokenizer(bloom_folder, tmp_path, lambda d: d["model"].update({option: value}))
    with pytest.raises(UnsupportedModelError, match=option) as error:
        convert(folder, tmp_path / "m.gguf", quant="f16")
    assert str(folder / "tokenizer.json") in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "m.gguf").exists()


def test_cli_refuses_in_one_line(bloom_folder, tmp_path):
    folder = _with_tokenizer(bloom_folder, tmp_path, lambda d: d.update(pre_tokenizer={"type": "Whitespace"}))
    proc = subprocess.run(
        [sys.executable, "-m", "pocketlm", "convert", str(folder), "-o", str(tmp_path / "m.gguf")],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("pocketlm: error: "), lines
    assert str(folder / "tokenizer.json") in lines[0] and "Whitespace" in lines[0]
    assert not (tmp_path / "m.gguf").exists()
