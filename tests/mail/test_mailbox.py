"""MaildirMailbox: scan order, UIDs, wire sizes, seen flags, deletion, the mailbox lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.mail.mailbox import (
    MailboxInUse,
    MaildirMailbox,
    SizeCache,
    WireSizer,
    lock_mailbox,
    valid_uid,
    wire_size,
)
from relaygate.mail.maildir import deliver, ensure_maildir
from relaygate.protocols.pop3 import MessageEncoder


def unstuff(wire: bytes) -> bytes:
    """Undo RETR framing: drop the final '.CRLF' and the dot-stuffing."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize("data,size", [
    (b"", 0),
    (b"a\r\n", 3),
    (b"a\n", 3),
    (b"a", 3),
    (b"a\nb", 6),
    (b"a\r", 3),
    (b"a\r\r\n", 4),
    (b"\n\n", 4),
])
def test_wire_size_examples(data: bytes, size: int) -> None:
    assert wire_size(data) == size
    enc = MessageEncoder()
    wire = enc.feed(data) + enc.finish()
    assert len(unstuff(wire)) == size


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=10))
def test_wire_size_matches_the_encoder_at_any_chunking(data: bytes, cuts: list[int]) -> None:
    chunks, rest = [], data
    for c in cuts:
        chunks.append(rest[:c])
        rest = rest[c:]
    chunks.append(rest)
    sizer, enc, wire = WireSizer(), MessageEncoder(), b""
    for c in chunks:
        sizer.feed(c)
        wire += enc.feed(c)
    wire += enc.finish()
    size = sizer.finish()
    assert size == wire_size(data)
    assert len(unstuff(wire)) == size
    # On the wire every line ends in CRLF and no line but the last is a lone dot.
    body = wire[:-3]
    assert body == b"" or body.endswith(b"\r\n")
    assert b"." not in body.split(b"\r\n")[:-1]
    assert b"\n" not in body.replace(b"\r\n", b"")


def test_valid_uid() -> None:
    assert valid_uid("1700000000.M1P2Q3.host,S=10") == "1700000000.M1P2Q3.host,S=10"
    long = "1700000000.M1P2Q3." + "h" * 80
    u = valid_uid(long)
    assert u.startswith("H") and len(u) == 41 and u == valid_uid(long)
    assert valid_uid("a b").startswith("H")


def test_scan_lists_new_and_cur_oldest_first(tmp_path: Path) -> None:
    box = tmp_path / "box"
    ensure_maildir(box)
    (box / "cur" / "200.M1P1Q1.h:2,S").write_bytes(b"second\n")
    (box / "new" / "100.M1P1Q1.h").write_bytes(b"first\n")
    (box / "new" / "1000.M1P1Q1.h").write_bytes(b"third\n")
    (box / "new" / ".hidden").write_bytes(b"not a message\n")
    (box / "tmp" / "300.M1P1Q1.h").write_bytes(b"in delivery\n")
    msgs = MaildirMailbox(box).scan()
    assert [m.uid for m in msgs] == ["100.M1P1Q1.h", "200.M1P1Q1.h", "1000.M1P1Q1.h"]
    assert [m.size for m in msgs] == [7, 8, 7]
    assert [m.seen for m in msgs] == [False, True, False]


def test_same_second_deliveries_keep_their_order(tmp_path: Path) -> None:
    box = tmp_path / "box"
    ensure_maildir(box)
    names = ["1700000000.M62345P7Q2.h", "1700000000.M587331P7Q1.h", "1700000000.M587331P7Q10.h"]
    for n in names:
        (box / "new" / n).write_bytes(b"x\n")
    assert [m.uid for m in MaildirMailbox(box).scan()] == [names[0], names[1], names[2]]
    paths = [deliver(box, f"m{i}\n".encode()) for i in range(20)]
    uids = [m.uid for m in MaildirMailbox(box).scan()][3:]
    assert uids == [p.name for p in paths]


def test_unique_names_sort_as_text_in_delivery_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # Readers that order new/ by name (the IMAP library does) see arrival order: the
    # microseconds are zero-padded (M095000 < M130000 as text too).
    from relaygate.mail import maildir

    clock = iter([1700000000.095, 1700000000.13, 1700000000.9, 1700000001.25])
    monkeypatch.setattr(maildir.time, "time", lambda: next(clock))
    names = [maildir.unique_name(10) for _ in range(4)]
    assert sorted(names) == names
    assert ".M095000P" in names[0] and ".M250000P" in names[3]


def test_mark_seen_and_delete(tmp_path: Path) -> None:
    box = tmp_path / "box"
    p1 = deliver(box, b"one\n")
    p2 = deliver(box, b"two\n", subdir="cur", flags="F")
    mb = MaildirMailbox(box)
    m1, m2 = mb.scan()
    mb.mark_seen(m1)
    assert not p1.exists()
    assert m1.path == box / "cur" / f"{p1.name}:2,S"
    assert m1.path.exists() and m1.seen
    mb.mark_seen(m2)
    assert m2.path.name.endswith(":2,FS")
    mb.mark_seen(m2)  # idempotent
    assert m2.path.name.endswith(":2,FS")
    assert not p2.exists()
    # uids do not change with flags
    assert [m.uid for m in mb.scan()] == [m1.uid, m2.uid]
    assert mb.delete(m1)
    assert not m1.path.exists()
    assert mb.delete(m1)  # already gone counts as gone


def test_follows_a_message_renamed_by_another_reader(tmp_path: Path) -> None:
    box = tmp_path / "box"
    p = deliver(box, b"x\n")
    mb = MaildirMailbox(box)
    (m,) = mb.scan()
    moved = box / "cur" / f"{p.name}:2,T"
    os.rename(p, moved)
    with mb.open(m) as f:
        assert f.read() == b"x\n"
    assert mb.delete(m)
    assert not moved.exists()


def test_size_cache_survives_renames(tmp_path: Path) -> None:
    box = tmp_path / "box"
    deliver(box, b"a\nb\n")
    cache = SizeCache()
    mb = MaildirMailbox(box, sizes=cache)
    (m,) = mb.scan()
    mb.mark_seen(m)
    assert len(cache._sizes) == 1
    (m2,) = mb.scan()
    assert m2.size == 6 and len(cache._sizes) == 1


def test_lock_is_exclusive_in_process(tmp_path: Path) -> None:
    box = tmp_path / "box"
    lock = lock_mailbox(box)
    with pytest.raises(MailboxInUse):
        lock_mailbox(box)
    with pytest.raises(MailboxInUse):
        lock_mailbox(tmp_path / "." / "box")  # same mailbox, other spelling
    lock.release()
    lock_mailbox(box).release()


def test_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    box = tmp_path / "box"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from relaygate.mail.mailbox import lock_mailbox\n"
        "l = lock_mailbox(Path(sys.argv[1]))\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(box)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxInUse):
            lock_mailbox(box)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    # the other process is gone: its lock died with it
    lock_mailbox(box).release()


def test_read_whole_in_part_renamed_and_removed(tmp_path: Path) -> None:
    from relaygate.mail.mailbox import MailboxError

    box = tmp_path / "box"
    small, large = b"Subject: s\n\nsmall\n", b"Subject: l\n\n" + b"z" * 5000 + b"\n"
    p1, p2 = deliver(box, small), deliver(box, large)
    mb = MaildirMailbox(box)
    m1, m2 = mb.scan()
    assert mb.read(m1, 100) == (small, None)
    data, f = mb.read(m2, 100)
    assert data == large[:100] and f is not None
    with f:
        assert f.read() == large[100:]
    assert mb.read(m2, len(large)) == (large, None)  # exactly the limit: whole
    os.rename(p1, box / "cur" / f"{p1.name}:2,S")  # another reader marked it seen
    assert mb.read(m1, 100) == (small, None)
    assert m1.path == box / "cur" / f"{p1.name}:2,S"
    p2.unlink()
    with pytest.raises(MailboxError, match="has been removed"):
        mb.read(m2, 100)
