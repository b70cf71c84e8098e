"""TextStream: complete characters only, stop sequences across token boundaries."""

from __future__ import annotations

from runtime.text import TextStream


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
