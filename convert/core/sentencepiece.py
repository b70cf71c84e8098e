"""SentencePiece models (`spiece.model`), read without the sentencepiece library.

`read_spm_model` parses the protobuf wire format directly; `t5_tokenizer` rebuilds from it
the `tokenizers` tokenizer transformers makes of a T5 spiece.model, so conversion and
runtime tokenize with the same ids as Hugging Face's fast T5 tokenizer and neither needs
sentencepiece (nor protobuf).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UnsupportedModelError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SPM_UNIGRAM = 1  # TrainerSpec.model_type
# ModelProto.SentencePiece.Type
SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED = 1, 2, 3, 4
METASPACE = "\u2581"
T5_EXTRA_IDS = 100
T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # T5Tokenizer's pad, eos and unk tokens


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, the rest as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield key >> 3, value
            continue
        if wire == 2:
            n, pos = _varint(buf, pos)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos + n > len(buf):
            raise ValueError("truncated field")
        yield key >> 3, buf[pos : pos + n]
        pos += n


@dataclass
class SpmModel:
    """What tokenization depends on in a `spiece.model` (a sentencepiece ModelProto)."""

    pieces: list[tuple[str, float, int]]  # piece, score, type
    model_type: int
    charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool

    @property
    def unk_id(self) -> int | None:
        """The id of the unknown piece (sentencepiece's own unk_id), None if there is none."""
        return next((i for i, (_, _, kind) in enumerate(self.pieces) if kind == SPM_UNKNOWN), None)


def read_spm_model(path: Path) -> SpmModel:
    """Parse the fields of a SentencePiece model file that tokenization depends on.

    The protobuf wire format is read directly (no sentencepiece/protobuf dependency);
    proto2 defaults apply to absent fields."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UnsupportedModelError(f"{path}: cannot read: {e.strerror or e}") from None
    pieces: list[tuple[str, float, int]] = []
    model_type, charsmap = SPM_UNIGRAM, b""
    flags = {3: True, 4: True, 5: True}  # add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces
    try:
        for num, value in _proto_fields(data):
            if num == 1 and isinstance(value, bytes):  # repeated SentencePiece
                piece, score, kind = "", 0.0, 1
                for f, v in _proto_fields(value):
                    if f == 1 and isinstance(v, bytes):
                        piece = v.decode("utf-8")
                    elif f == 2 and isinstance(v, bytes):
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and isinstance(v, int):
                        kind = v
                pieces.append((piece, score, kind))
            elif num == 2 and isinstance(value, bytes):  # TrainerSpec
                model_type = next((v for f, v in _proto_fields(value) if f == 3 and isinstance(v, int)), SPM_UNIGRAM)
            elif num == 3 and isinstance(value, bytes):  # NormalizerSpec
                for f, v in _proto_fields(value):
                    if f == 2 and isinstance(v, bytes):
                        charsmap = v
                    elif f in flags and isinstance(v, int):
                        flags[f] = bool(v)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise UnsupportedModelError(f"{path}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise UnsupportedModelError(f"{path}: not a SentencePiece model (no pieces)")
    return SpmModel(pieces, model_type, charsmap, flags[3], flags[4], flags[5])


def t5_sentinels(n_pieces: int, vocab_size: int) -> list[str]:
    """The sentinel tokens numbered after the pieces, in id order: Hugging Face's T5 tokenizer
    puts up to 100 of them there in reverse (<extra_id_0> last), as many as the embedding holds."""
    n_extra = max(0, min(T5_EXTRA_IDS, vocab_size - n_pieces))
    return [f"<extra_id_{n_extra - 1 - j}>" for j in range(n_extra)]


def t5_tokenizer(spm: SpmModel, vocab_size: int, where: str = "spiece.model") -> Tokenizer:
    """The tokenizer transformers' T5Tokenizer builds from this spiece.model.

    As transformers 5 does: a Unigram model of the pieces and the sentinels (no byte
    fallback), the precompiled charsmap as the only normalizer, WhitespaceSplit then
    Metaspace (always prefixed) as pre-tokenizer, </s> appended; control pieces, <pad>,
    </s>, <unk> and the sentinels are special tokens, user-defined pieces plain added
    tokens. The unknown id is the model's own unknown piece (2 in every T5)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    if spm.model_type != SPM_UNIGRAM:
        raise UnsupportedModelError(f"{where}: SentencePiece model type {spm.model_type} is not unigram")
    names = [piece for piece, _, _ in spm.pieces]
    if "</s>" not in names:
        raise UnsupportedModelError(f"{where}: no </s> piece, which a T5 tokenizer appends to every input")
    sentinels = t5_sentinels(len(names), vocab_size)
    vocab = [(piece, score) for piece, score, _ in spm.pieces] + [(s, 0.0) for s in sentinels]
    tok = Tokenizer(Unigram(vocab, unk_id=spm.unk_id, byte_fallback=False))
    if spm.charsmap:
        try:
            tok.normalizer = normalizers.Precompiled(spm.charsmap)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed charsmap
            raise UnsupportedModelError(f"{where}: unusable precompiled_charsmap ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"],
        pair=["$A", "</s>", "$B", "</s>"],
        special_tokens=[("</s>", names.index("</s>"))],
    )
    added = [
        AddedToken(piece, normalized=False, special=kind == SPM_CONTROL or piece in T5_SPECIAL)
        for piece, _, kind in spm.pieces
        if kind in (SPM_CONTROL, SPM_USER_DEFINED) or piece in T5_SPECIAL
    ]
    added += [AddedToken(s, normalized=False, special=True) for s in sentinels]
    tok.add_tokens(added)
    return tok


def t5_tokenizer_json(spm: SpmModel, vocab_size: int, where: str = "spiece.model") -> bytes:
    """`t5_tokenizer` as the bytes of a tokenizer.json file."""
    return t5_tokenizer(spm, vocab_size, where).to_str(pretty=True).encode("utf-8")
