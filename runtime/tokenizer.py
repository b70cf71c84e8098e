"""Tokenizers for engines that take token ids from us (CTranslate2): HF tokenizer.json or
a bare SentencePiece model, with the same ids as the Hugging Face tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, Sequence

from convert.core.errors import GenerationError, ModelLoadError


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A `tokenizer.json`, run by the `tokenizers` library (what transformers uses)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ModelLoadError(f"{path}: unreadable tokenizer ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class SentencePieceT5Tokenizer:
    """`spiece.model` plus T5's conventions: sentinels after the pieces, </s> appended, and
    special tokens written in the text (<extra_id_N>, </s>, <unk>, <pad>) read as their ids."""

    SPECIAL = re.compile(r"<extra_id_\d+>|</s>|<unk>|<pad>")

    def __init__(self, path: Path, vocab: list[str], eos: int):
        try:
            import sentencepiece
        except ImportError:
            raise ModelLoadError("this model's tokenizer needs: pip install sentencepiece") from None
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self._n = self._sp.get_piece_size()
        self._ids = {tok: i for i, tok in enumerate(vocab)}
        self._vocab, self._eos = vocab, eos

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in self.SPECIAL.finditer(text):
            ids += self._sp.encode(text[pos : m.start()]) if text[pos : m.start()].strip() else []
            ids.append(self._ids.get(m.group(0), self._sp.unk_id()))
            pos = m.end()
        if text[pos:] or not ids:
            ids += self._sp.encode(text[pos:])
        return ids + [self._eos]

    def decode(self, ids: Sequence[int]) -> str:
        # special tokens (control pieces, <unk>, sentinels) are skipped, as the HF tokenizer does
        pieces = [i for i in ids if i < self._n and not (self._sp.is_control(i) or self._sp.is_unknown(i))]
        return self._sp.decode(pieces)


class IncrementalDecoder:
    """Decode a growing id list, returning only the new text each time.

    A window of recent ids is re-decoded so that spacing rules that depend on the previous
    token (SentencePiece's leading '▁') come out as in a full decode; text ending in an
    incomplete character (U+FFFD) is held until a later token completes it.
    """

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def push(self, token: int) -> bytes:
        self._ids.append(token)
        return self._advance(final=False)

    def flush(self) -> bytes:
        return self._advance(final=True)

    def _advance(self, final: bool) -> bytes:
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :].encode("utf-8")
        return b""


def load_tokenizer(folder: Path, name: str | None, vocab: list[str], eos: int) -> Tokenizer | None:
    if not name:
        return None
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise ModelLoadError(f"{folder}: pocketlm.json names tokenizer {name!r}, which is not a file in the model folder")
    path = folder / name
    if not path.is_file():
        raise ModelLoadError(f"{path}: tokenizer file listed in pocketlm.json is missing")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceT5Tokenizer(path, vocab, eos)


def require(tok: Tokenizer | None, path: str) -> Tokenizer:
    if tok is None:
        raise GenerationError(
            f"{path} has no tokenizer (converted without tokenizer files); pass token ids instead of text"
        )
    return tok
