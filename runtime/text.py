"""Turning a stream of token bytes into text pieces that are safe to show.

Token pieces of byte-level tokenizers can end in the middle of a UTF-8 character, and a
stop sequence can arrive split across tokens. `TextStream` releases only complete characters
and holds back any tail that might still become a stop sequence, so the pieces it yields
always concatenate to exactly the final text.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str] | None = None):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in (stop or []) if s]
        self._text = ""  # decoded, not yet released
        self.released = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add a token's bytes; return the text that can be shown now ("" if none)."""
        if self.stopped:
            return ""
        self._text += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is held back (an incomplete character becomes U+FFFD)."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # Invariant: released text never ends with the start of a stop sequence (it is held
        # back instead), so a stop can only begin inside the unreleased text.
        text = self._text
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            cut = min(hits)
        elif final:
            cut = len(text)
        else:
            cut = len(text) - self._held_back(text)
        piece = text[:cut]
        self._text = "" if self.stopped else text[cut:]
        self.released += piece
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest
