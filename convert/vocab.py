"""Tokenizers of Hugging Face checkpoints, written as GGUF tokenizer metadata.

llama.cpp re-implements each tokenizer from the GGUF keys alone, so the keys must describe
exactly what the HF tokenizer does: the model type, the pre-tokenizer (by llama.cpp's name
for it), the token list padded to the embedding size, token types, merges and special ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .checkpoint import read_json
from .errors import UnsupportedModelError

log = logging.getLogger(__name__)

# HF pre-tokenizer regexes that llama.cpp implements, by llama.cpp's `tokenizer.ggml.pre` name.
BLOOM_SPLIT_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"
PRE_TOKENIZER_BY_REGEX = {BLOOM_SPLIT_REGEX: "bloom"}

SPECIAL_ID_KEYS = ("bos", "eos", "unk", "pad")


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]


def _pre_tokenizer_name(pre: Any, path: Path) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or an error if it has none."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in PRE_TOKENIZER_BY_REGEX and steps[0].get("behavior") == "Isolated":
            return PRE_TOKENIZER_BY_REGEX[pattern]
    raise UnsupportedModelError(
        f"{path}: pre-tokenizer {kinds} is not one llama.cpp reproduces; converting it would "
        "tokenize differently (remove tokenizer.json to convert for token-id input only)"
    )


def read_bpe_tokenizer(path: Path, vocab_size: int, config: dict[str, Any]) -> GGUFVocab:
    """A byte-level BPE `tokenizer.json` as llama.cpp's `gpt2` tokenizer keys."""
    data = read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UnsupportedModelError(f"{path}: expected a BPE tokenizer, found {model.get('type')!r}")
    if data.get("normalizer"):
        raise UnsupportedModelError(
            f"{path}: a BPE tokenizer with a normalizer is not reproduced by llama.cpp"
        )
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"), path)

    by_id: dict[int, tuple[str, int]] = {
        i: (tok, gguf.TokenType.NORMAL) for tok, i in model["vocab"].items()
    }
    for added in data.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    n_tokens = max(by_id) + 1
    if n_tokens > vocab_size:
        raise UnsupportedModelError(
            f"{path}: {n_tokens} tokens but the embedding has only {vocab_size} rows"
        )
    tokens, types = [], []
    for i in range(vocab_size):  # pad the id space up to the embedding rows
        tok, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(tok)
        types.append(int(kind))

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise UnsupportedModelError(f"{path}: BPE tokenizer has no merges")
    return GGUFVocab("gpt2", pre, tokens, types, merges, special_ids(config, vocab_size))


def special_ids(config: dict[str, Any], vocab_size: int) -> dict[str, int]:
    ids = {}
    for key in SPECIAL_ID_KEYS:
        value = config.get(f"{key}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if type(value) is int and 0 <= value < vocab_size:
            ids[key] = value
    return ids


def add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    add_special_ids(writer, vocab.special_ids)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def add_special_ids(writer: gguf.GGUFWriter, ids: dict[str, int]) -> None:
    for key, value in ids.items():
        getattr(writer, f"add_{key}_token_id")(value)


def add_no_vocab(writer: gguf.GGUFWriter, vocab_size: int, config: dict[str, Any]) -> None:
    """Keys for a model without tokenizer files: it still runs on token ids."""
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(vocab_size)
    add_special_ids(writer, special_ids(config, vocab_size))


@dataclass
class TokenList:
    """A vocabulary as one unique string per id, and the tokenizer file it came from."""

    tokens: list[str]
    file: Path | None
    unk: int | None
    warnings: list[str]


def _placeholders(tokens: list[str | None]) -> list[str]:
    """Fill unused ids with unique names (CTranslate2 maps tokens by string)."""
    taken = {t for t in tokens if t is not None}
    out = []
    for i, tok in enumerate(tokens):
        if tok is None:
            tok = f"<unused_{i}>"
            while tok in taken:
                tok = "_" + tok
            taken.add(tok)
        out.append(tok)
    return out


def _spm_pieces(path: Path) -> list[str]:
    try:
        import sentencepiece
    except ImportError:
        raise UnsupportedModelError(f"{path}: reading spiece.model needs: pip install sentencepiece") from None
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
        raise UnsupportedModelError(f"{path}: not a SentencePiece model ({e})") from None
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


T5_EXTRA_IDS = 100


def t5_vocabulary(folder: Path, vocab_size: int, special: dict[str, int]) -> TokenList:
    """T5-family ids -> token strings from tokenizer.json (preferred) or spiece.model.

    With spiece.model only, the 100 sentinel tokens follow the pieces in reverse order
    (<extra_id_0> is the last), as Hugging Face's T5 tokenizer numbers them.
    """
    tokens: list[str | None] = [None] * vocab_size
    warnings: list[str] = []
    unk = None
    tokenizer_json, spiece = folder / "tokenizer.json", folder / "spiece.model"
    if tokenizer_json.is_file():
        data = read_json(tokenizer_json)
        model = data.get("model") or {}
        if model.get("type") != "Unigram":
            raise UnsupportedModelError(f"{tokenizer_json}: expected a Unigram (SentencePiece) tokenizer, found {model.get('type')!r}")
        entries = [(i, piece) for i, (piece, _score) in enumerate(model.get("vocab") or [])]
        entries += [(a["id"], a["content"]) for a in data.get("added_tokens") or []]
        unk = model.get("unk_id")
        source: Path | None = tokenizer_json
    elif spiece.is_file():
        pieces = _spm_pieces(spiece)
        n_extra = max(0, min(T5_EXTRA_IDS, vocab_size - len(pieces)))
        entries = list(enumerate(pieces))
        entries += [(len(pieces) + j, f"<extra_id_{n_extra - 1 - j}>") for j in range(n_extra)]
        unk = pieces.index("<unk>") if "<unk>" in pieces else None
        source = spiece
    else:
        warnings.append(f"{folder}: no tokenizer.json or spiece.model; the model will run on token ids only")
        entries = [(special.get("pad", 0), "<pad>"), (special.get("eos", 1), "</s>"), (2, "<unk>")]
        source = None
    for i, tok in entries:
        if not 0 <= i < vocab_size:
            raise UnsupportedModelError(f"{source or folder}: token id {i} is outside the embedding ({vocab_size} rows)")
        tokens[i] = tok
    if len({t for t in tokens if t is not None}) != sum(t is not None for t in tokens):
        raise UnsupportedModelError(f"{source}: duplicate token strings; ids would be ambiguous")
    return TokenList(_placeholders(tokens), source, unk, warnings)
