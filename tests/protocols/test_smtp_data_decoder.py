"""DataDecoder: end of data, unstuffing and the refusal facts, in pieces of any size."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.protocols.smtp_data import LINE_LIMIT, DataDecoder


def reference(stream: bytes, line_limit: int = LINE_LIMIT
              ) -> tuple[bytes, int, bool, bool] | None:
    """Line by line, as RFC 5321 4.1.1.4/4.5.2 read: (content, used, bare, too_long)."""
    lines: list[bytes] = []
    pos = 0
    while True:
        i = stream.find(b"\r\n", pos)
        if i < 0:
            return None  # no end of data
        line = stream[pos:i + 2]
        pos = i + 2
        if line == b".\r\n":
            break
        lines.append(line)
    content = b"".join(x[1:] if x.startswith(b".") else x for x in lines)
    raw = b"".join(lines)
    crlf = raw.count(b"\r\n")
    bare = raw.count(b"\r") != crlf or raw.count(b"\n") != crlf
    too_long = any(len(x) > line_limit for x in lines)
    return content, pos, bare, too_long


def run(stream: bytes, cuts: list[int], line_limit: int = LINE_LIMIT
        ) -> tuple[bytes, int, DataDecoder]:
    d = DataDecoder(line_limit=line_limit)
    out: list[bytes] = []
    used = 0
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in itertools.pairwise(bounds):
        piece = stream[a:b]
        content, n = d.feed(piece)
        out.append(content)
        used += n
        if d.done:
            assert n <= len(piece)
            break
        assert n == len(piece)
    return b"".join(out), used, d


def test_simple_message_and_pipelined_command() -> None:
    d = DataDecoder()
    content, used = d.feed(b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\nQUIT\r\n")
    assert d.done and content == b"Subject: x\r\n\r\n.dot\r\nend\r\n"
    assert used == len(b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\n")
    assert d.size == len(content) and not d.bare and not d.too_long
    assert d.feed(b"more") == (b"", 0)


def test_empty_message() -> None:
    d = DataDecoder()
    assert d.feed(b".\r\n") == (b"", 3)
    assert d.done and d.size == 0


def test_marker_split_in_single_bytes() -> None:
    stream = b"a\r\n.b\r\n.\r\nNOOP\r\n"
    content, used, d = run(stream, list(range(len(stream))))
    assert d.done and content == b"a\r\nb\r\n" and used == len(stream) - 6


def test_fake_ends_do_not_end_data() -> None:
    for fake in (b"x\n.\nMAIL", b"x\n.\r\nMAIL", b"x\r\n.\nMAIL", b"x\r.\r\nMAIL",
                 b"x\r\n.\rMAIL"):
        d = DataDecoder()
        d.feed(fake + b"\r\n")
        assert not d.done and d.bare, fake
    d = DataDecoder()
    d.feed(b"clean\r\n")
    assert not d.bare


def test_long_line_across_pieces() -> None:
    d = DataDecoder()
    for _ in range(9):
        d.feed(b"y" * 110)
    d.feed(b"y" * 8)
    assert not d.too_long  # 998 octets so far
    d.feed(b"y")
    assert d.too_long
    d.feed(b"\r\n.\r\n")
    assert d.done
    d = DataDecoder()
    d.feed(b"y" * 998)
    d.feed(b"\r\n.\r\n")
    assert d.done and not d.too_long  # 998 + CRLF = 1000


ALPHABET = st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"xyz"])


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(ALPHABET, max_size=40), cuts=st.lists(st.integers(0, 400), max_size=8),
       limit=st.sampled_from([4, 8, LINE_LIMIT]))
def test_matches_line_by_line_reading(parts: list[bytes], cuts: list[int], limit: int) -> None:
    stream = b"".join(parts) + b"\r\n.\r\nRSET\r\n"
    expected = reference(stream, limit)
    assert expected is not None
    content, used, d = run(stream, cuts, limit)
    assert d.done
    assert (content, used, d.bare, d.too_long) == expected
    assert d.size == len(content)
