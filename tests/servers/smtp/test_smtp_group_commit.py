"""Group commit seen from SMTP: concurrent transfers share directory fsyncs, and no
client gets its ``250`` before its own message file and directory entry are durable.

The server runs in the test process (``SmtpHarness``), so ``os.fsync`` and
``os.rename`` are replaced by recorders that number every event in one order;
directory fsyncs are slowed down so the transfers pile up behind them. Each
client notes when its ``250`` arrived. Whatever the implementation, the
checks are: the file was fsynced before its rename, a directory fsync that
*began after* the rename *ended before* the client saw ``250``, and twenty
transfers caused fewer than twenty directory fsyncs.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from test_smtp_support import LOCAL, STRANGER_IP, SmtpHarness

#: how long a directory fsync takes here
SLOW = 0.05
N = 20


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n = 0
        self.items: list[tuple[int, str, str]] = []

    def note(self, kind: str, what: str) -> int:
        with self.lock:
            self.n += 1
            self.items.append((self.n, kind, what))
            return self.n

    def of(self, kind: str, what: str) -> list[int]:
        return [n for n, k, w in self.items if k == kind and w == what]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[Events]:
    ev = Events()
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            ev.note("dir-start", path)
            time.sleep(SLOW)
            real_fsync(fd)
            ev.note("dir-end", path)
        else:
            real_fsync(fd)
            ev.note("file", path)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_rename(src, dst)
        ev.note("rename", os.fspath(src) + " -> " + os.fspath(dst))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    yield ev


@pytest.fixture
def h(tmp_path: Path) -> Iterator[SmtpHarness]:
    harness = SmtpHarness(tmp_path)
    yield harness
    harness.stop()


async def send_all(port: int, events: Events) -> dict[str, int]:
    """N clients at once, each one message to alice; msgid -> when its 250 arrived."""
    got: dict[str, int] = {}

    async def one(i: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30,
                                 source_address=(STRANGER_IP, 0))
        await client.connect()
        _, reply = await client.sendmail(f"s{i}@sender.example", [f"alice@{LOCAL}"],
                                         f"Subject: {i}\r\n\r\nbody {i}\r\n")
        when = events.note("reply", reply)
        match = re.search(r"id=([0-9a-f]+)", reply)
        assert match, reply
        got[match.group(1)] = when
        await client.quit()

    await asyncio.gather(*(one(i) for i in range(N)))
    return got


def test_concurrent_deliveries_share_fsyncs_and_each_250_waits_for_its_own(
        h: SmtpHarness, events: Events) -> None:
    replies = asyncio.run(send_all(h.port(), events))
    assert len(replies) == N
    new = h.tmp / "mail" / "alice" / "new"
    starts = [n for n, k, w in events.items if k == "dir-start" and w == str(new)]
    ends = [n for n, k, w in events.items if k == "dir-end" and w == str(new)]
    fsyncs = list(zip(starts, ends, strict=True))
    assert 1 <= len(fsyncs) < N, fsyncs
    for path in new.iterdir():
        msgid = re.search(rb"with ESMTP id ([0-9a-f]+)", path.read_bytes())
        assert msgid is not None
        replied = replies[msgid.group(1).decode()]
        tmp_name = path.name.split(",S=")[0]
        tmp = str(h.tmp / "mail" / "alice" / "tmp" / tmp_name)
        (synced,) = events.of("file", tmp)
        (renamed,) = events.of("rename", f"{tmp} -> {path}")
        assert synced < renamed < replied
        assert any(renamed < start and end < replied for start, end in fsyncs), (
            "a 250 went out before a directory fsync covering its message",
            renamed, replied, fsyncs)


def test_a_maildir_recreated_after_removal_has_its_entries_synced_before_250(
        h: SmtpHarness, events: Events) -> None:
    import shutil

    msg = "Subject: again\r\n\r\nbody\r\n"
    c = h.client()
    assert c.sendmail("s@sender.example", [f"alice@{LOCAL}"], msg) == {}
    mail = h.tmp / "mail"
    # the administrator removes the mailbox, and the directory holding it
    shutil.rmtree(mail)
    assert c.sendmail("s@sender.example", [f"alice@{LOCAL}"], msg) == {}
    replied = events.note("reply", "second")
    c.quit()
    assert len(h.maildir_messages("alice")) == 1
    box = mail / "alice"

    def synced(path: Path) -> bool:
        """A fsync of ``path`` ended before the 250 (and after the directories came back)."""
        return any(k == "dir-end" and w == str(path) and n < replied
                   for n, k, w in events.items)

    # each directory made again is named in its parent: those entries must be durable
    # too, or a crash after the 250 loses new/ and the message in it
    assert synced(box / "new")
    assert synced(box), "alice's Maildir was not fsynced after new/ was made in it"
    assert synced(mail), "mail/ was not fsynced after alice/ was made in it"
    assert synced(h.tmp), "the data directory was not fsynced after mail/ was made in it"
