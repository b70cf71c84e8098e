"""Structured output: a constraint on what a sequence may say, as a mask over its next token.

A request may constrain its output by one of `GenerationOptions`' `json_schema`, `regex`,
`choice` or `grammar` (Lark, or llama.cpp's GBNF). llguidance compiles it against the engine's
vocabulary (`Vocabulary`, built once per engine from each token's bytes) and follows each
sequence through it (`Guide`): before a step, the tokens that keep the output inside the
constraint (`fill_masks` computes every running sequence's mask in one call); after it, the
token taken. End tokens are allowed exactly where the constraint may end, and a sequence
whose constraint can go no further ends there.

The constraint applies to the text the caller receives. A SentencePiece decoder drops the first
token's leading space (T5's "▁"), so on such a vocabulary the grammar allows one leading space
the text will not show. A constraint the vocabulary cannot spell (JSON on T5, which has no "{")
is refused with the characters it lacks.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pocketlm.converters.core.errors import EngineError, RequestError

if TYPE_CHECKING:
    from pocketlm.core.generation import GenerationOptions

CONSTRAINTS = ("json_schema", "regex", "choice", "grammar")  # GenerationOptions fields, at most one set
# JSON as json.dumps writes it: free whitespace lets a model pad forever (and small ones do)
COMPILED_KEPT = 64  # constraints a vocabulary keeps compiled (the least recently used go first)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@functools.cache
def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the mask helpers)
    except ImportError as e:  # a dependency: only a broken install lacks it
        raise EngineError(f"structured output needs the llguidance package ({e})") from None
    return llguidance


def constraint_of(options: GenerationOptions) -> tuple[str, Any] | None:
    """The constraint options ask for, as (field, value), or None."""
    for name in CONSTRAINTS:
        value = getattr(options, name)
        if value:
            return name, value
    return None


def lark_of(kind: str, value: Any) -> str:
    """A Lark rule body (llguidance's dialect) for one constraint: what `start` must match."""
    if kind == "json_schema":  # value: the schema's JSON text
        schema = json.loads(value)
        if isinstance(schema, dict):  # one way to space JSON (json.dumps'), unless the schema says
            schema = {**schema, "x-guidance": schema.get("x-guidance", JSON_LAYOUT)}
        return "%json " + json.dumps(schema)
    if kind == "regex":
        return "/" + value.replace("/", "\\/") + "/"
    if kind == "choice":
        return " | ".join(json.dumps(c) for c in value)
    raise ValueError(kind)


def grammar_of(kind: str, value: Any, leading_space: bool = False) -> str:
    """llguidance's grammar (its JSON form) for a constraint; `leading_space`: one optional
    space in front (one the decoder will drop from the text)."""
    llg = _llguidance()
    if kind == "grammar":
        text = value
        if "::=" in text:  # llama.cpp's GBNF
            from llguidance.gbnf_to_lark import gbnf_to_lark

            text = gbnf_to_lark(text)
        if not leading_space:
            return llg.grammar_from("lark", text)
        return json.dumps({"grammars": [{"lark_grammar": 'start: " "? @user'}, {"name": "user", "lark_grammar": text}]})
    space = '" "? ' if leading_space else ""
    return llg.grammar_from("lark", f"start: {space}({lark_of(kind, value)})")


class Vocabulary:
    """An engine's tokens as llguidance sees them.

    `tokens[i]`: token i's bytes inside a text, or None for a token that is not text (control,
    unknown, padding); `drops_leading_space`: whether the decoded text of a sequence loses its
    first token's leading space (SentencePiece). llguidance also asks for the tokens of short
    texts (those a constraint forces): it gets the longest tokens that spell them, because a
    model's own tokenizer may add to a text (SentencePiece's leading "▁", T5's "</s>")."""

    def __init__(self, tokens: Sequence[bytes | None], end_ids: Sequence[int], drops_leading_space: bool = False):
        llg = _llguidance()
        self.size = len(tokens)
        self.end_ids = list(end_ids)
        self.drops_leading_space = drops_leading_space
        special = [i for i, t in enumerate(tokens) if t is None or t == b""]
        ids: dict[bytes, int] = {}
        for i, t in enumerate(tokens):
            if t:
                ids.setdefault(t, i)
        longest = max(map(len, ids), default=1)

        @functools.lru_cache(maxsize=4096)  # llguidance asks again for the same bytes as it decodes
        def spell(data: bytes) -> tuple[int, ...]:
            """The longest tokens that spell `data`, left to right, up to a byte no token has."""
            out: list[int] = []
            at = 0
            while at < len(data):
                for n in range(min(longest, len(data) - at), 0, -1):
                    token = ids.get(data[at : at + n])
                    if token is not None:
                        out.append(token)
                        at += n
                        break
                else:  # no token has this byte: only what comes before it is spelled
                    break
            return tuple(out)

        class Wrapped:  # what llguidance's TokenizerWrapper reads
            eos_token_id = self.end_ids[0]
            bos_token_id = None
            special_token_ids = special

            def __init__(self) -> None:
                self.tokens = [t if t else f"<[{i}]>".encode() for i, t in enumerate(tokens)]

            def __call__(self, data: bytes) -> list[int]:
                return list(spell(data))

        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(Wrapped()), eos_token=self.end_ids)
        self.tokens = list(tokens)
        self._text = np.array([bool(t) for t in tokens])
        self._text[[i for i in self.end_ids if i < self.size]] = False
        self._lengths = np.array([len(t) if t else 0 for t in tokens])
        self._first_bytes = np.array([t[0] if t else -1 for t in tokens])
        self._start_bytes = frozenset(self._first_bytes.tolist())  # bytes some token starts with

        class Bytes:  # one token per byte, and an end: what a constraint allows, byte by byte
            eos_token_id = 256
            bos_token_id = None
            special_token_ids = [256]
            tokens = [bytes([b]) for b in range(256)] + [b"<end>"]

            def __call__(self, data: bytes) -> list[int]:
                return list(data)

        self.probe = llg.LLTokenizer(llg.TokenizerWrapper(Bytes()))
        spelled = b"".join(t for t in tokens if t)
        if all(bytes([b]) in set(tokens) for b in range(256)):  # byte tokens spell anything
            self.characters = None
        else:
            self.characters = set(spelled.decode("utf-8", "ignore"))
        self._compiled: dict[tuple[str, Any], Constraint] = {}
        self._lock = threading.Lock()
        self.executor = llg.LLExecutor()

    def constraint(self, kind: str, value: Any) -> Constraint:
        """The constraint compiled for this vocabulary (cached), or a RequestError saying why
        not: an invalid schema/regex/grammar, or characters the vocabulary cannot write."""
        key = (kind, value)
        with self._lock:
            found = self._compiled.pop(key, None)
            if found is not None:
                self._compiled[key] = found  # the most recently used last
        if found is None:
            found = Constraint(self, kind, value)
            with self._lock:
                self._compiled[key] = found
                while len(self._compiled) > COMPILED_KEPT:
                    del self._compiled[next(iter(self._compiled))]
        return found

    def first_of_each_byte(self, mask: np.ndarray) -> list[int]:
        """Of the allowed tokens that are not end tokens, the shortest and the longest for each
        first byte (the shortest first)."""
        ids = np.nonzero(mask[: self.size] & self._text)[0]
        if ids.size == 0:
            return []
        ids = ids[np.argsort(self._lengths[ids], kind="stable")]
        _, shortest = np.unique(self._first_bytes[ids], return_index=True)
        _, longest = np.unique(self._first_bytes[ids[::-1]], return_index=True)
        picked = [*ids[np.sort(shortest)].tolist(), *ids[::-1][longest].tolist()]
        return list(dict.fromkeys(picked))

    def lacking(self, allowed_bytes: Sequence[int]) -> list[str]:
        """Of the bytes a constraint allows next, the characters no token can write (non-ASCII
        bytes are named by the characters they may start, when no token starts with them)."""
        if self.characters is None:
            return []
        out = set()
        for b in allowed_bytes:
            if b < 0x80:
                if chr(b) not in self.characters:
                    out.add(chr(b))
            elif b not in self._start_bytes:
                out.add(f"byte 0x{b:02x}")
        return sorted(out)


class Constraint:
    """One compiled constraint: makes a `Guide` for each sequence it applies to."""

    def __init__(self, vocabulary: Vocabulary, kind: str, value: Any):
        llg = _llguidance()
        self.vocabulary, self.kind, self.value = vocabulary, kind, value
        self._start: Guide | None = None  # what every guide starts as a copy of
        self._lock = threading.Lock()
        try:
            self.grammar = grammar_of(kind, value, vocabulary.drops_leading_space)
        except Exception as e:  # llguidance's converters raise ValueError and their own errors
            raise RequestError(f"{kind}: {one_line(str(e))}") from None
        error = llg.LLMatcher.validate_grammar(self.grammar, vocabulary.tokenizer)
        if error:
            raise RequestError(f"{kind}: {one_line(error)}")
        self._check_spelled()

    def _check_spelled(self) -> None:
        """Refuse a constraint this vocabulary cannot complete. A depth-first search for an
        output, over the shortest and the longest token of each first byte, within a budget of
        steps; if every path dead-ends where the constraint wants characters no token has, they
        are named (a dead end only of the paths tried is no proof: accepted).
        (Undecided within the budget: accepted; a dead end met while generating is refused then.)"""
        v = self.vocabulary
        if v.characters is None:  # byte tokens spell anything
            return
        wanted: set[str] = set()
        budget = [300]

        def search(guide: Guide, depth: int) -> bool | None:  # None: undecided
            if guide.matcher.is_accepting():
                return True
            if budget[0] <= 0 or depth > 64:
                return None
            budget[0] -= 1
            missing = guide.needs()
            if missing:
                wanted.update(missing)
                return False
            candidates = v.first_of_each_byte(guide.fill())
            if not candidates:
                return False
            undecided = False
            for token in candidates:
                twin = guide.copy()
                twin.advance(token)
                found = search(twin, depth + 1)
                if found:
                    return True
                undecided |= found is None
            return None if undecided else False

        if search(self.guide(), 0) is False and wanted:  # refused only for characters no token has
            what = ", ".join(repr(c) for c in sorted(wanted))
            raise RequestError(f"{self.kind}: this model's vocabulary cannot write {what}, which the constraint needs")

    def guide(self) -> Guide:
        """A fresh follower of the constraint, for one sequence: a copy of one made once, with
        its first mask (a copy costs microseconds, a new matcher about a millisecond)."""
        with self._lock:
            if self._start is None:
                self._start = Guide(_llguidance().LLMatcher(self.vocabulary.tokenizer, self.grammar), self)
                self._start.fill()  # the first mask is every sequence's first mask
            return self._start.copy()


def one_line(error: str) -> str:
    """llguidance's error (a line, then the source with carets, then "error: why") as one line."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid"
    head = re.sub(r"^at \d+\(\d+\): ", "", lines[0]).removesuffix(":").removesuffix(" regex parse error")
    head = head.removesuffix(":").replace(" (in regex)", "")
    why = next((line[len("error:") :].strip() for line in lines[1:] if line.startswith("error:")), "")
    return f"{head}: {why}" if why else head


def allocate(rows: int, vocab: int) -> np.ndarray:
    """Bitmask rows (int32 words, token i is bit i % 32 of word i // 32) for `vocab` tokens."""
    return np.zeros((rows, (vocab + 31) // 32), dtype=np.int32)


def allowed(bits: np.ndarray, vocab: int) -> np.ndarray:
    """A bitmask row as booleans over the `vocab` tokens."""
    return np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab].astype(bool)


class Guide:
    """One sequence's place in its constraint: the mask of its next token (`fill`, or filled
    with others by `fill_masks`), and the tokens it took (`advance`)."""

    def __init__(self, matcher: Any, constraint: Constraint):
        self.matcher, self.constraint = matcher, constraint
        self.mask: np.ndarray | None = None  # the next token's allowed ids (booleans), once filled
        self.open = False  # that mask allows some token
        self.text = bytearray()  # the bytes taken so far

    @property
    def stopped(self) -> bool:
        """The constraint is complete and nothing may follow: the sequence ends here."""
        return bool(self.matcher.is_stopped())

    def fill(self) -> np.ndarray:
        """The next token's mask (computed now if `fill_masks` has not)."""
        if self.mask is None:
            fill_masks([self])
        assert self.mask is not None
        return self.mask

    def needs(self) -> list[str]:
        """The characters the constraint requires next (all of those it forces, or every one
        it allows) that the vocabulary cannot write; empty if it can go on."""
        llg = _llguidance()
        vocabulary = self.constraint.vocabulary
        if vocabulary.characters is None:
            return []
        forced = self.matcher.compute_ff_bytes().decode("utf-8", "ignore")
        lacking = sorted({ch for ch in forced if ch not in vocabulary.characters})
        if lacking or forced:
            return lacking
        if (self.fill() & vocabulary._text).any() or self.matcher.is_accepting():
            return []
        probe = llg.LLMatcher(vocabulary.probe, self.constraint.grammar)
        for b in bytes(self.text):
            probe.consume_token(b)
        bits = np.frombuffer(probe.compute_bitmask(), dtype=np.int32)
        return vocabulary.lacking(np.nonzero(allowed(bits, 256))[0].tolist())

    def apply(self, row: np.ndarray) -> np.ndarray:
        """`row` with every token the constraint forbids at -inf (a new array). At a dead end
        (nothing allowed, the constraint incomplete) the request is refused."""
        mask = self.fill()
        if not self.open:
            what = ", ".join(repr(c) for c in self.needs()) or "what the constraint needs next"
            raise RequestError(
                f"{self.constraint.kind}: this model's vocabulary cannot write {what}, which the constraint needs here"
            )
        if row.shape[-1] == mask.size:
            return np.where(mask, row, row.dtype.type(-np.inf))
        n = min(row.shape[-1], mask.size)  # logits padded past the vocabulary
        out = np.full_like(row, -np.inf)
        out[:n] = np.where(mask[:n], row[:n], row.dtype.type(-np.inf))
        return out

    def advance(self, token: int) -> None:
        """The sequence took `token` (one its mask allowed)."""
        self.mask = None
        self.text += self.constraint.vocabulary.tokens[token] or b""
        if not self.matcher.consume_token(token):
            raise EngineError(f"the constraint refused token {token}: {self.matcher.get_error()}")

    def forced(self) -> list[int]:
        """Tokens the constraint forces next (the only way on), which need no model call to choose."""
        return [] if self.matcher.is_stopped() else list(self.matcher.compute_ff_tokens())

    def copy(self) -> Guide:
        """An independent follower at the same place (a beam continuing another)."""
        twin = Guide(self.matcher.deep_copy(), self.constraint)
        twin.mask, twin.open, twin.text = self.mask, self.open, bytearray(self.text)
        return twin


def fill_masks(guides: Sequence[Guide]) -> None:
    """Compute the next-token masks of several sequences in one call (llguidance's threads)."""
    todo = [g for g in guides if g.mask is None]
    if not todo:
        return
    llg = _llguidance()
    by_vocab: dict[int, list[Guide]] = {}
    for g in todo:
        by_vocab.setdefault(id(g.constraint.vocabulary), []).append(g)
    for group in by_vocab.values():
        vocabulary = group[0].constraint.vocabulary
        bits = allocate(len(group), vocabulary.size)
        if len(group) == 1:
            llg.numpy.fill_next_token_bitmask(group[0].matcher, bits, 0)
        else:
            llg.numpy.fill_next_token_bitmask_par(
                vocabulary.executor, [(g.matcher, i) for i, g in enumerate(group)], bits
            )
        for g, row in zip(group, bits):
            g.mask, g.open = allowed(row, vocabulary.size), bool(row.any())
