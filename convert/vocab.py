"""Tokenizers of Hugging Face checkpoints, written as GGUF tokenizer metadata.

llama.cpp re-implements each tokenizer from the GGUF keys alone, so the keys must describe
exactly what the HF tokenizer does: the model type, the pre-tokenizer (by llama.cpp's name
for it), the token list padded to the embedding size, token types, merges and special ids.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from .checkpoint import read_json
from .core.errors import UnsupportedModelError
from .core.sentencepiece import (
    METASPACE,
    SPM_UNIGRAM,
    SpmModel,
    read_spm_model,
    t5_sentinels,
    t5_tokenizer_json,
)

log = logging.getLogger(__name__)

# The split regexes of Hugging Face byte-level BPE pre-tokenizers that llama.cpp reproduces, and
# the `tokenizer.ggml.pre` name llama.cpp knows each by (src/llama-vocab.cpp of llama-cpp-python
# 0.3.36; any other name fails to load). GPT-2's is the regex `ByteLevel(use_regex=True)` applies.
GPT2_SPLIT_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
BLOOM_SPLIT_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"
PRE_TOKENIZER_BY_REGEX = {GPT2_SPLIT_REGEX: "gpt-2", BLOOM_SPLIT_REGEX: "bloom"}
# BPE model options llama.cpp's BPE tokenizer does not have (each is off when unset or falsy).
BPE_OPTIONS_UNSUPPORTED = (
    "dropout",
    "continuing_subword_prefix",
    "end_of_word_suffix",
    "byte_fallback",
    "ignore_merges",
)

SPECIAL_ID_KEYS = ("bos", "eos", "unk", "pad")


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    # SentencePiece unigram (llama.cpp's `t5` / UGM model) only:
    scores: list[float] | None = None
    charsmap: bytes | None = None  # the normalizer's precompiled_charsmap
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    add_eos: bool = False  # HF's T5 tokenizer appends </s>
    warnings: list[str] = field(default_factory=list)


def _describe_pre_tokenizer(steps: list[Any]) -> str:
    """A pre-tokenizer as one short line, for error messages."""
    parts = []
    for step in steps:
        if not isinstance(step, dict):
            parts.append("none" if step is None else repr(step))
            continue
        options = {k: v for k, v in step.items() if k != "type"}
        if isinstance(options.get("pattern"), dict):
            options["pattern"] = next(iter(options["pattern"].values()), None)
        parts.append(f"{step.get('type')}({', '.join(f'{k}={v!r}' for k, v in options.items())})")
    return " + ".join(parts)


def _split_regex(steps: list[Any]) -> str | None:
    """The regex a byte-level pre-tokenizer splits text with, if it is one llama.cpp can mirror:
    `ByteLevel` with its own (GPT-2) regex, or a `Split` (isolated matches) then `ByteLevel`
    without regex. Neither may add a prefix space: llama.cpp never does."""
    if not steps or not all(isinstance(s, dict) for s in steps):
        return None
    byte_level = steps[-1]
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space", True):
        return None
    if len(steps) == 1:
        return GPT2_SPLIT_REGEX if byte_level.get("use_regex", True) else None
    split = steps[0]
    if len(steps) != 2 or split.get("type") != "Split" or byte_level.get("use_regex", True):
        return None
    if split.get("behavior") != "Isolated" or split.get("invert", False):
        return None
    pattern = split.get("pattern")
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def _pre_tokenizer_name(pre: Any, path: Path) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or an error if it has none."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    name = PRE_TOKENIZER_BY_REGEX.get(_split_regex(steps) or "")
    if name is None:
        raise UnsupportedModelError(
            f"{path}: pre-tokenizer {_describe_pre_tokenizer(steps)} matches none of the llama.cpp "
            f"pre-tokenizers PocketLM writes ({', '.join(PRE_TOKENIZER_BY_REGEX.values())}); converting it "
            "would tokenize differently (remove tokenizer.json to convert for token-id input only)"
        )
    return name


def read_bpe_tokenizer(path: Path, vocab_size: int, config: dict[str, Any]) -> GGUFVocab:
    """A byte-level BPE `tokenizer.json` as llama.cpp's `gpt2` tokenizer keys."""
    data = read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UnsupportedModelError(f"{path}: expected a BPE tokenizer, found {model.get('type')!r}")
    changed = {k: model[k] for k in BPE_OPTIONS_UNSUPPORTED if model.get(k)}
    if changed:
        raise UnsupportedModelError(f"{path}: BPE options {changed} are not reproduced by llama.cpp")
    if data.get("normalizer"):
        raise UnsupportedModelError(f"{path}: a BPE tokenizer with a normalizer is not reproduced by llama.cpp")
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"), path)

    by_id: dict[int, tuple[str, int]] = {i: (tok, gguf.TokenType.NORMAL) for tok, i in model["vocab"].items()}
    for added in data.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    n_tokens = max(by_id) + 1
    if n_tokens > vocab_size:
        raise UnsupportedModelError(f"{path}: {n_tokens} tokens but the embedding has only {vocab_size} rows")
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
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.remove_extra_whitespaces is not None:
        writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    if vocab.charsmap:
        writer.add_precompiled_charsmap(vocab.charsmap)
    add_special_ids(writer, vocab.special_ids)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(vocab.add_eos)


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
    """A vocabulary as one unique string per id, the tokenizer file it came from, and the
    tokenizer.json the runtime encodes text with: that file, or one built from spiece.model."""

    tokens: list[str]
    file: Path | None
    unk: int | None
    warnings: list[str]
    tokenizer_json: Path | bytes | None = None


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


def t5_vocabulary(folder: Path, vocab_size: int, special: dict[str, int]) -> TokenList:
    """T5-family ids -> token strings from tokenizer.json (preferred) or spiece.model.

    With spiece.model only, the 100 sentinel tokens follow the pieces in reverse order
    (<extra_id_0> is the last), as Hugging Face's T5 tokenizer numbers them, and the
    tokenizer.json transformers would make of it is built (no sentencepiece needed to run).
    """
    tokens: list[str | None] = [None] * vocab_size
    warnings: list[str] = []
    unk = None
    spm: SpmModel | None = None
    tokenizer_json, spiece = folder / "tokenizer.json", folder / "spiece.model"
    if tokenizer_json.is_file():
        data = read_json(tokenizer_json)
        model = data.get("model") or {}
        if model.get("type") != "Unigram":
            raise UnsupportedModelError(
                f"{tokenizer_json}: expected a Unigram (SentencePiece) tokenizer, found {model.get('type')!r}"
            )
        entries = [(i, piece) for i, (piece, _score) in enumerate(model.get("vocab") or [])]
        entries += [(a["id"], a["content"]) for a in data.get("added_tokens") or []]
        unk = model.get("unk_id")
        source: Path | None = tokenizer_json
    elif spiece.is_file():
        spm = read_spm_model(spiece)
        pieces = [piece for piece, _, _ in spm.pieces]
        entries = list(enumerate(pieces + t5_sentinels(len(pieces), vocab_size)))
        unk = spm.unk_id
        source = spiece
    else:
        warnings.append(f"{folder}: no tokenizer.json or spiece.model; the model will run on token ids only")
        entries = [(special.get("pad", 0), "<pad>"), (special.get("eos", 1), "</s>"), (2, "<unk>")]
        source = None
    for i, tok in entries:
        if not 0 <= i < vocab_size:
            raise UnsupportedModelError(
                f"{source or folder}: token id {i} is outside the embedding ({vocab_size} rows)"
            )
        tokens[i] = tok
    if len({t for t in tokens if t is not None}) != sum(t is not None for t in tokens):
        raise UnsupportedModelError(f"{source}: duplicate token strings; ids would be ambiguous")
    runtime_tokenizer = t5_tokenizer_json(spm, vocab_size, str(spiece)) if spm is not None else source
    return TokenList(_placeholders(tokens), source, unk, warnings, runtime_tokenizer)


# -- SentencePiece unigram (T5 family) as llama.cpp's `t5` (UGM) tokenizer ---------------

UNUSED_SCORE = -1e9  # padding ids: llama.cpp's matcher sees them, so they must never win
# SentencePiece piece types (sentencepiece_model.proto) have the same numbers as gguf.TokenType.
SPM_TYPES = {int(t) for t in gguf.TokenType}


def _normalizer_steps(node: Any) -> list[dict[str, Any]]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [s for n in node.get("normalizers") or node.get("pretokenizers") or [] for s in _normalizer_steps(n)]
    return [node]


def _unigram_settings(data: dict[str, Any], path: Path) -> tuple[bytes, bool, bool, list[str]]:
    """(precompiled charsmap, add space prefix, merge spaces, warnings) of a T5 tokenizer.json,
    or an error for a normalizer or pre-tokenizer llama.cpp's UGM tokenizer does not have."""
    charsmap, merge, split, warnings = b"", False, False, []
    for step in _normalizer_steps(data.get("normalizer")):
        kind = step.get("type")
        if kind == "Precompiled":
            charsmap = base64.b64decode(step.get("precompiled_charsmap") or "")
        elif kind == "Replace" and (step.get("pattern") or {}).get("Regex") == " {2,}" and step.get("content") == " ":
            merge = True
        elif kind == "Strip":
            continue  # subsumed by merging spaces (SentencePiece strips and merges together)
        else:
            raise UnsupportedModelError(
                f"{path}: normalizer {kind!r} is not one llama.cpp's SentencePiece tokenizer reproduces "
                "(remove tokenizer.json to convert for token-id input only)"
            )
    prefix = None
    for step in _normalizer_steps(data.get("pre_tokenizer")):
        kind = step.get("type")
        if kind == "WhitespaceSplit":
            merge = split = True
        elif kind == "Metaspace" and step.get("replacement", METASPACE) == METASPACE:
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            prefix = scheme != "never"
            if scheme == "first":
                warnings.append(
                    f"{path}: Metaspace prepend_scheme 'first'; llama.cpp prefixes a space to text after "
                    "special tokens too, so ids can differ right after a special token with no space before the text"
                )
        else:
            raise UnsupportedModelError(
                f"{path}: pre-tokenizer {kind!r} is not one llama.cpp's SentencePiece tokenizer reproduces"
            )
    if prefix is None:
        raise UnsupportedModelError(f"{path}: a SentencePiece tokenizer.json without a Metaspace pre-tokenizer")
    if merge and not split:
        warnings.append(
            f"{path}: this tokenizer.json turns a trailing space (also one before a special token) into a "
            "'\u2581' token; llama.cpp, like sentencepiece itself, drops it, so such inputs get one id fewer"
        )
    return charsmap, prefix, merge, warnings


def _appends_eos(data: dict[str, Any], eos: int, path: Path) -> bool:
    """Whether the post-processor appends </s> to a single sequence (T5's template: A </s>)."""
    post = data.get("post_processor")
    if not post:
        return False
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    if single is None:
        raise UnsupportedModelError(f"{path}: post-processor {post.get('type')!r} is not reproduced by llama.cpp")
    kinds = ["A" if "Sequence" in s else (s.get("SpecialToken") or {}).get("id") for s in single]
    ids = {k: v.get("ids") for k, v in (post.get("special_tokens") or {}).items()}
    if kinds == ["A"]:
        return False
    if len(kinds) == 2 and kinds[0] == "A" and ids.get(kinds[1]) == [eos]:
        return True
    raise UnsupportedModelError(
        f"{path}: post-processor template {kinds} is not one llama.cpp reproduces (only 'A </s>')"
    )


def _unigram_entries(model: dict[str, Any], added_tokens: list[Any]) -> dict[int, tuple[str, float, int]]:
    """id -> (piece, score, token type) of a tokenizer.json Unigram model and its added tokens."""
    unk = model.get("unk_id")
    entries: dict[int, tuple[str, float, int]] = {}
    for i, (piece, score) in enumerate(model["vocab"]):
        kind = gguf.TokenType.UNKNOWN if i == unk else gguf.TokenType.NORMAL
        entries[i] = (str(piece), float(score), int(kind))
    for added in added_tokens:
        i = int(added["id"])
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        score = entries[i][1] if i in entries else 0.0
        entries[i] = (str(added["content"]), score, int(gguf.TokenType.UNKNOWN if i == unk else kind))
    return entries


def read_t5_tokenizer(folder: Path, vocab_size: int, special: dict[str, int]) -> GGUFVocab | None:
    """A T5-family SentencePiece unigram tokenizer as llama.cpp's `t5` (UGM) tokenizer keys.

    From tokenizer.json (preferred) or spiece.model; None when the folder has neither. Ids
    past the tokenizer (vocab_size 32128 vs 32100 pieces) are unused placeholders; </s> is
    appended to every input, as Hugging Face's T5 tokenizer does.
    """
    tokenizer_json, spiece = folder / "tokenizer.json", folder / "spiece.model"
    entries: dict[int, tuple[str, float, int]] = {}
    warnings: list[str] = []
    if tokenizer_json.is_file():
        data = read_json(tokenizer_json)
        model = data.get("model") or {}
        if model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
            raise UnsupportedModelError(
                f"{tokenizer_json}: expected a Unigram (SentencePiece) tokenizer, found {model.get('type')!r}"
            )
        if model.get("byte_fallback"):
            raise UnsupportedModelError(
                f"{tokenizer_json}: byte_fallback is not supported by llama.cpp's unigram tokenizer"
            )
        try:
            entries = _unigram_entries(model, data.get("added_tokens") or [])
            charsmap, prefix, merge, warnings = _unigram_settings(data, tokenizer_json)
            add_eos = _appends_eos(data, special.get("eos", 1), tokenizer_json)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise UnsupportedModelError(f"{tokenizer_json}: malformed tokenizer ({type(e).__name__}: {e})") from None
        source = tokenizer_json
    elif spiece.is_file():
        spm = read_spm_model(spiece)
        if spm.model_type != SPM_UNIGRAM:
            raise UnsupportedModelError(f"{spiece}: SentencePiece model type {spm.model_type} is not unigram")
        if not spm.escape_whitespaces:
            raise UnsupportedModelError(f"{spiece}: escape_whitespaces=false is not supported")
        if any(kind == gguf.TokenType.BYTE for _, _, kind in spm.pieces):
            raise UnsupportedModelError(
                f"{spiece}: byte-fallback pieces are not supported by llama.cpp's unigram tokenizer"
            )
        for i, (piece, score, kind) in enumerate(spm.pieces):
            entries[i] = (piece, score, kind if kind in SPM_TYPES else int(gguf.TokenType.NORMAL))
        for j, sentinel in enumerate(t5_sentinels(len(spm.pieces), vocab_size)):
            entries[len(spm.pieces) + j] = (sentinel, 0.0, int(gguf.TokenType.CONTROL))
        charsmap, prefix, merge, add_eos = spm.charsmap, spm.add_dummy_prefix, spm.remove_extra_whitespaces, True
        source = spiece
    else:
        return None

    bad = [i for i in entries if not 0 <= i < vocab_size]
    if bad:
        raise UnsupportedModelError(f"{source}: token id {bad[0]} is outside the embedding ({vocab_size} rows)")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        tok, score, kind = entries.get(i, (f"[PAD{i}]", UNUSED_SCORE, int(gguf.TokenType.UNUSED)))
        tokens.append(tok)
        scores.append(score)
        types.append(kind)
    if len(set(tokens)) != len(tokens):
        raise UnsupportedModelError(f"{source}: duplicate token strings; llama.cpp requires unique tokens")
    ids = {k: v for k, v in special.items() if k in SPECIAL_ID_KEYS and 0 <= v < vocab_size}
    unk_ids = [i for i, k in enumerate(types) if k == gguf.TokenType.UNKNOWN]
    if unk_ids:
        ids["unk"] = unk_ids[0]
    return GGUFVocab(
        "t5",
        None,
        tokens,
        types,
        [],
        ids,
        scores=scores,
        charsmap=charsmap or None,
        add_space_prefix=prefix,
        remove_extra_whitespaces=merge,
        add_eos=add_eos,
        warnings=warnings,
    )
