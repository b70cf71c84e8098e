"""Turning a stream of token bytes into text pieces that are safe to show.

Token pieces of byte-level tokenizers can end in the middle of a UTF-8 character, and a
stop sequence can arrive split across tokens. `TextStream` releases only complete characters
and holds back any tail that might still become a stop sequence, so the pieces it yields
always concatenate to exactly the final text. Stop sequences are found with an Aho-Corasick
automaton, so the cost per character does not grow with their number.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Protocol


class Detokenizer(Protocol):
    """Incremental decoding: the bytes each new token adds, and what is held at the end."""

    def push(self, token: int) -> bytes: ...
    def flush(self) -> bytes: ...


class BytePieces:
    """A Detokenizer for tokens that are byte strings (byte-level BPE): pieces concatenate."""

    def __init__(self, piece: Callable[[int], bytes]):
        self.push = piece

    def flush(self) -> bytes:
        return b""


class StopMatcher:
    """Finds stop sequences in text given piece by piece (Aho-Corasick over characters).

    `scan(piece)` says where the earliest stop ending inside `piece` starts; `depth` is the
    length of the longest tail of the text so far that is the start of a stop (what a stream
    must hold back). Building costs the stops' total length; scanning, one step per character
    amortised, whatever their number."""

    def __init__(self, stops: list[str]):
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        self._longest = [0]  # length of the longest stop ending at this node (0: none)
        for stop in stops:
            node = 0
            for ch in stop:
                nxt = self._goto[node].get(ch)
                if nxt is None:
                    nxt = self._goto[node][ch] = len(self._goto)
                    self._goto.append({})
                    self._depth.append(self._depth[node] + 1)
                    self._longest.append(0)
                node = nxt
            self._longest[node] = len(stop)
        self._fail = [0] * len(self._goto)
        queue = list(self._goto[0].values())
        for node in queue:  # breadth first: a node's failure link is set before its children's
            for ch, child in self._goto[node].items():
                fail = self._fail[node]
                while fail and ch not in self._goto[fail]:
                    fail = self._fail[fail]
                target = self._goto[fail].get(ch, 0)
                self._fail[child] = target if target != child else 0
                if not self._longest[child]:
                    self._longest[child] = self._longest[self._fail[child]]
                queue.append(child)
        self._state = 0

    @property
    def depth(self) -> int:
        return self._depth[self._state]

    def scan(self, piece: str) -> int | None:
        """Feed `piece`; the start (relative to `piece`, negative if it began earlier) of the
        earliest-starting stop that ends inside it, or None."""
        goto, fail, longest = self._goto, self._fail, self._longest
        state, best = self._state, None
        for i, ch in enumerate(piece):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if longest[state]:
                start = i + 1 - longest[state]
                if best is None or start < best:
                    best = start
        self._state = state
        return best


class TextStream:
    def __init__(self, stop: list[str] | None = None):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = [s for s in (stop or []) if s]
        self._stops = StopMatcher(stops) if stops else None
        self._text = ""  # decoded, not yet released
        self.released = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add a token's bytes; return the text that can be shown now ("" if none)."""
        if self.stopped:
            return ""
        return self._release(self._decoder.decode(data), final=False)

    def finish(self) -> str:
        """Flush what is held back (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(self._decoder.decode(b"", final=True), final=True)

    def _release(self, new: str, final: bool) -> str:
        # Invariant: the unreleased text is exactly the tail that might start a stop sequence,
        # so a stop found now begins there or in the new text.
        held, text = len(self._text), self._text + new
        start = self._stops.scan(new) if self._stops is not None and new else None
        if start is not None:
            self.stopped = True
            cut = held + start
        elif final or self._stops is None:
            cut = len(text)
        else:
            cut = len(text) - self._stops.depth
        piece = text[:cut]
        self._text = "" if self.stopped else text[cut:]
        self.released += piece
        return piece
