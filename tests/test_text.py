"""TextStream: complete characters only, stop sequences across token boundaries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pocketlm.core.text import StopMatcher, TextStream


def _feed(chunks, stop=None):
    s = TextStream(stop)
    pieces = [s.push(c) for c in chunks]
    pieces.append(s.finish())
    return pieces, s


def test_multibyte_characters_are_held_until_complete():
    data = "é世🙂".encode()
    pieces, s = _feed([data[i : i + 1] for i in range(len(data))])
    assert "".join(pieces) == "é世🙂" == s.released
    assert all(p in ("", "é", "世", "🙂") for p in pieces)


def test_stop_split_across_tokens():
    pieces, s = _feed([b"Hello ", b"wor", b"ld! ", b"END", b"ignored"], stop=["world"])
    assert s.released == "Hello " and s.stopped
    assert "".join(pieces) == "Hello "


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    pieces, s = _feed([b"ab", b"c", b"d"], stop=["cx"])
    assert "".join(pieces) == "abcd" and not s.stopped
    assert pieces[0] == "ab" and pieces[1] == ""  # "c" held: it might start "cx"


def test_earliest_of_several_stops_wins():
    _, s = _feed([b"one two three"], stop=["three", "two"])
    assert s.released == "one "


def test_incomplete_tail_becomes_replacement_char():
    pieces, s = _feed([b"ok" + "🙂".encode()[:2]])
    assert s.released == "ok\ufffd"


def _reference(chunks: list[str], stops: list[str]) -> str:
    """What the stream must release: the text up to the earliest-starting stop that is complete
    when the chunk ending it arrives (stops are searched in what has arrived so far)."""
    text = ""
    for chunk in chunks:
        text += chunk
        hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if hits:
            return text[: min(hits)]
    return text


@given(
    chunks=st.lists(st.text(alphabet="abc", max_size=4), max_size=8),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=6),
)
@settings(max_examples=400, deadline=None)
def test_stops_are_found_as_searching_all_text_so_far_finds_them(chunks, stops):
    pieces, s = _feed([c.encode() for c in chunks], stop=stops)
    assert "".join(pieces) == s.released == _reference(chunks, stops)


def test_twenty_thousand_stops_in_one_automaton():
    matcher = StopMatcher([f"stop-{i:05d}!" for i in range(20_000)])
    assert matcher.scan("x" * 100) is None and matcher.depth == 0
    assert matcher.scan("... stop-0") is None and matcher.depth == len("stop-0")  # held: may become a stop
    assert matcher.scan("4242!") == -len("stop-0")  # began in the earlier piece
