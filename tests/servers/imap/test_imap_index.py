"""The IMAP folder index: one uidlist read per command, no mailbox I/O on the event
loop, stale UID entries pruned, and POP3 and IMAP agreeing on one Maildir."""

from __future__ import annotations

import imaplib
import poplib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymap.backend.maildir.uidlist import UidList
from test_imap import PASSWORD, Harness, login

from relaygate.config import AuthSettings, Pop3Settings, Settings
from relaygate.context import Context
from relaygate.mail.maildir import deliver
from relaygate.metrics import Metrics
from relaygate.servers.pop3 import make_service as make_pop3


def message(i: int, size: int = 2000) -> bytes:
    head = f"Subject: m{i}\r\nMessage-ID: <{i}@example.test>\r\n\r\n".encode()
    return head + b"y" * size + b"\r\n"


def uidlist_keys(root: Path) -> list[str]:
    return [rec.key for rec in UidList.file_read(str(root)).records]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path).start()
    yield h
    h.stop()


class MaildirIO:
    """Audit hook: file opens and directory listings under a path, by thread."""

    active: MaildirIO | None = None
    installed = False

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.calls: list[tuple[str, str, str]] = []

    @classmethod
    def hook(cls, event: str, args: tuple[Any, ...]) -> None:
        me = cls.active
        if me is None or event not in ("open", "os.listdir", "os.rename", "os.remove"):
            return
        path = args[0] if args else None
        if isinstance(path, bytes | str) and str(path).startswith(me.root):
            me.calls.append((event, str(path), threading.current_thread().name))

    def __enter__(self) -> MaildirIO:
        if not MaildirIO.installed:
            sys.addaudithook(MaildirIO.hook)
            MaildirIO.installed = True
        MaildirIO.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        MaildirIO.active = None


def test_fetch_reads_the_uidlist_once_and_no_file_on_the_loop(harness: Harness) -> None:
    root = harness.alice.maildir
    for i in range(40):
        deliver(root, message(i), subdir="new")
    c = login(harness)
    assert c.select("INBOX")[0] == "OK"
    loop_thread = harness.thread.name
    with MaildirIO(root) as io:
        typ, data = c.fetch("1:*", "(BODY.PEEK[] FLAGS)")
    assert typ == "OK"
    assert sum(1 for d in data if isinstance(d, tuple)) == 40
    uidlist_reads = [c for c in io.calls if c[1].endswith("dovecot-uidlist")]
    # pymap re-read the uidlist for each message (40+ reads, all on the loop)
    assert len(uidlist_reads) <= 2, uidlist_reads
    on_loop = [c for c in io.calls if c[2] == loop_thread]
    assert on_loop == []
    assert len([c for c in io.calls if c[0] == "open" and "/cur/" in c[1]]) == 40
    c.logout()


def test_fetch_after_flag_change_and_outside_rename(harness: Harness) -> None:
    root = harness.alice.maildir
    for i in range(3):
        deliver(root, message(i), subdir="new")
    c = login(harness)
    c.select("INBOX")
    assert c.store("2", "+FLAGS", "(\\Flagged)")[0] == "OK"
    # another program renames message 3's file (its flags) behind the index's back
    (f,) = [p for p in (root / "cur").iterdir() if p.name.startswith(sorted(
        p.name.split(":")[0] for p in (root / "cur").iterdir())[2])]
    f.rename(f.with_name(f.name.split(":")[0] + ":2,S"))
    typ, data = c.fetch("1:3", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    text = b"".join(d[0] + d[1] if isinstance(d, tuple) else d for d in data)
    assert text.count(b"Subject: m") == 3
    assert b"\\Flagged" in text
    c.logout()


def test_stale_entries_are_pruned_on_select(harness: Harness) -> None:
    root = harness.alice.maildir
    paths = [deliver(root, message(i), subdir="cur") for i in range(30)]
    c = login(harness)
    assert c.select("INBOX") == ("OK", [b"30"])
    c.logout()
    assert len(uidlist_keys(root)) == 30
    for p in paths[:25]:
        p.unlink()  # as POP3 DELE or another program does
    c = login(harness)
    assert c.select("INBOX") == ("OK", [b"5"])
    typ, data = c.uid("FETCH", "1:*", "(UID)")
    assert typ == "OK" and len(data) == 5
    c.logout()
    # pymap kept every deleted message's entry forever
    assert sorted(uidlist_keys(root)) == sorted(p.name.split(":")[0] for p in paths[25:])


def test_expunge_prunes_the_uidlist(harness: Harness) -> None:
    root = harness.alice.maildir
    for i in range(5):
        deliver(root, message(i), subdir="cur")
    c = login(harness)
    c.select("INBOX")
    c.store("1:2", "+FLAGS", "(\\Deleted)")
    assert c.expunge()[0] == "OK"
    assert len(uidlist_keys(root)) == 3
    assert c.select("INBOX") == ("OK", [b"3"])
    c.logout()


def test_new_files_get_uids_in_delivery_order_and_keep_them(harness: Harness) -> None:
    root = harness.alice.maildir
    names = [deliver(root, message(i), subdir="new").name for i in range(8)]
    c = login(harness)
    c.select("INBOX")
    assert c.fetch("1:*", "(UID)")[0] == "OK"
    _, data = c.fetch("1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = [d[1].strip() for d in data if isinstance(d, tuple)]
    assert subjects == [f"Subject: m{i}".encode() for i in range(8)]
    before = {r.key: r.uid for r in UidList.file_read(str(root)).records}
    assert set(before) == set(names)
    c.logout()
    c = login(harness)
    c.select("INBOX")
    c.logout()
    assert {r.key: r.uid for r in UidList.file_read(str(root)).records} == before


@pytest.fixture
def pop3(harness: Harness, tmp_path: Path) -> Iterator[int]:
    settings = Settings(data_dir=tmp_path / "pop3data", hostname="pop.example.test",
                        pop3=Pop3Settings(listen=("127.0.0.1:0",), listen_tls=()),
                        auth=AuthSettings(failure_delay=0.0))
    ctx = Context(settings, harness.control, Metrics(), harness.directory)
    service = make_pop3(ctx)
    harness.call(service.start())
    port = next(p for k, _, p in service.addresses() if k == "pop3")
    yield port
    harness.call(service.stop(1.0))


def pop_dele(port: int, numbers: list[int]) -> int:
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    p.user("alice")
    p.pass_(PASSWORD)
    count = p.stat()[0]
    for n in numbers:
        p.dele(n)
    p.quit()
    return count


def test_imap_read_then_pop3_dele_then_reselect(harness: Harness, pop3: int) -> None:
    root = harness.alice.maildir
    for i in range(4):
        deliver(root, message(i), subdir="new")
    c = login(harness)
    assert c.select("INBOX") == ("OK", [b"4"])
    typ, data = c.fetch("1", "(BODY[])")  # read: \Seen
    assert typ == "OK"
    c.logout()
    assert pop_dele(pop3, [1, 2]) == 4
    # POP3 QUIT pruned the UID list itself
    assert len(uidlist_keys(root)) == 2
    c = login(harness)
    assert c.select("INBOX") == ("OK", [b"2"])
    _, data = c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = [d[1].strip() for d in data if isinstance(d, tuple)]
    assert subjects == [b"Subject: m2", b"Subject: m3"]
    c.logout()


def test_imap_expunge_then_pop3_sees_the_rest(harness: Harness, pop3: int) -> None:
    root = harness.alice.maildir
    for i in range(4):
        deliver(root, message(i), subdir="new")
    c = login(harness)
    c.select("INBOX")
    c.store("1", "+FLAGS", "(\\Deleted)")
    c.expunge()
    c.logout()
    assert pop_dele(pop3, [1]) == 3
    c = login(harness)
    assert c.select("INBOX") == ("OK", [b"2"])
    _, data = c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = [d[1].strip() for d in data if isinstance(d, tuple)]
    assert subjects == [b"Subject: m2", b"Subject: m3"]
    c.logout()
    assert len(uidlist_keys(root)) == 2


def test_selected_session_sees_pop3_deletion(harness: Harness, pop3: int) -> None:
    root = harness.alice.maildir
    for i in range(3):
        deliver(root, message(i), subdir="cur")
    c = login(harness)
    c.select("INBOX")
    assert pop_dele(pop3, [2]) == 3
    typ, _ = c.noop()
    assert typ == "OK"
    assert c.untagged_responses.get("EXPUNGE") == [b"2"]
    c.logout()
    with pytest.raises(imaplib.IMAP4.error):
        c.select("INBOX")
