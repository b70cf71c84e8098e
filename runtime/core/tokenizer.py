"""Tokenizers for engines that take token ids from us (CTranslate2): HF tokenizer.json or
a bare T5 SentencePiece model, with the same ids as the Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pocketlm.converters.core.errors import ModelLoadError, RequestError, UnsupportedModelError
from pocketlm.converters.core.sentencepiece import read_spm_model, t5_tokenizer

if TYPE_CHECKING:
    import tokenizers


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face tokenizer run by the `tokenizers` library (what transformers uses):
    a `tokenizer.json`, or the one transformers builds from a T5 `spiece.model`."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok

    @classmethod
    def from_file(cls, path: Path) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            return cls(_Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ModelLoadError(f"{path}: unreadable tokenizer ({e})") from None

    @classmethod
    def from_t5_spiece(cls, path: Path, vocab_size: int) -> HFTokenizer:
        """For folders converted before tokenizer.json was built at conversion: the same build."""
        try:
            return cls(t5_tokenizer(read_spm_model(path), vocab_size, str(path)))
        except UnsupportedModelError as e:
            raise ModelLoadError(str(e)) from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def text_ids(self) -> set[int]:
        """Ids of the tokens that are text: every id the tokenizer knows but its special ones
        (T5's <pad>, </s>, <unk>, sentinels); a model's padding ids are not among them."""
        special = {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}
        return set(self._tok.get_vocab(with_added_tokens=True).values()) - special


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


def load_tokenizer(folder: Path, name: str | None, vocab_size: int) -> HFTokenizer | None:
    """The tokenizer file pocketlm.json names (None when the model runs on ids only)."""
    if not name:
        return None
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise ModelLoadError(
            f"{folder}: pocketlm.json names tokenizer {name!r}, which is not a file in the model folder"
        )
    path = folder / name
    if not path.is_file():
        raise ModelLoadError(f"{path}: tokenizer file listed in pocketlm.json is missing")
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    return HFTokenizer.from_t5_spiece(path, vocab_size)


def require(tok: Tokenizer | None, path: str) -> Tokenizer:
    if tok is None:
        raise RequestError(
            f"{path} has no tokenizer (converted without tokenizer files); pass token ids instead of text"
        )
    return tok
