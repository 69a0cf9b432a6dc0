"""IMAP IDLE woken by inotify (relaygate.servers.imap.notify): every kind of change to a
folder reaches an IDLE client promptly, watches are shared per folder and released,
unchanged folders are not looked at, and polling takes over where inotify cannot help.

The change tests set the fallback intervals to two minutes: a client that sees the
change within seconds was woken by the kernel, not by a poll.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import poplib
import shutil
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_imap import PASSWORD, Harness, Raw, login

from relaygate.config import AuthSettings, Pop3Settings, Settings, SmtpSettings
from relaygate.context import Context
from relaygate.mail.maildir import deliver, ensure_maildir
from relaygate.metrics import Metrics
from relaygate.servers.imap import backend as imap_backend
from relaygate.servers.imap import notify
from relaygate.servers.pop3 import make_service as make_pop3
from relaygate.servers.smtp.service import make_services as make_smtp

#: fallback intervals during the change tests: far longer than any wait below
NEVER = 120.0
#: how long a change may take to reach the client (the fallback would take NEVER)
PROMPT = 5.0

MESSAGE = (b"From: carol@example.test\r\nTo: alice@example.test\r\nSubject: hello\r\n"
           b"Message-ID: <idle@example.test>\r\n\r\nbody\r\n")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path).start()
    yield h
    h.stop()
    h.assert_clean()


@pytest.fixture
def no_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the kernel can wake an IDLE session within the test's time."""
    monkeypatch.setattr(notify, "SAFETY_NET_INTERVAL", NEVER)
    monkeypatch.setattr(notify, "POLL_INTERVAL", NEVER)


def idle(h: Harness, *, user: str = "alice", password: str = PASSWORD,
         source: str = "127.0.0.2", folder: str = "INBOX") -> Raw:
    r = Raw(h.port, source)
    assert r.cmd(b"a", f'LOGIN {user} "{password}"'.encode())[-1].startswith(b"a OK")
    assert r.cmd(b"b", f"SELECT {folder}".encode())[-1].startswith(b"b OK")
    r.send(b"c IDLE\r\n")
    assert r.line().startswith(b"+ ")
    return r


def wait_for(r: Raw, needle: bytes, timeout: float = PROMPT) -> tuple[bytes, float]:
    """Read untagged lines until one contains ``needle``; (lines, seconds it took)."""
    start = time.monotonic()
    r.sock.settimeout(timeout)
    seen = b""
    try:
        while needle not in seen:
            line = r.line()
            if not line:
                break
            seen += line
    except TimeoutError:
        pass
    return seen, time.monotonic() - start


def done(r: Raw) -> None:
    r.sock.settimeout(10)
    r.send(b"DONE\r\n")
    assert r.until_tagged(b"c")[-1].startswith(b"c OK")
    r.cmd(b"z", b"LOGOUT")
    r.close()


def counts(h: Harness) -> tuple[int, int]:
    async def read() -> tuple[int, int]:
        return h.service.notifier.folders, h.service.notifier.watches
    result: tuple[int, int] = h.call(read())
    return result


def settle(h: Harness, want: tuple[int, int], timeout: float = 5.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    got = counts(h)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = counts(h)
    return got


# -- every kind of change reaches the IDLE client ---------------------------------


def test_delivery_by_relaygate_smtp_wakes_idle(harness: Harness, tmp_path: Path,
                                               no_polls: None) -> None:
    settings = Settings(data_dir=tmp_path / "smtpdata", hostname="mx.example.test",
                        domains=("example.test",),
                        smtp=SmtpSettings(listen=("127.0.0.1:0",), submission=(), smtps=()))
    ctx = Context(settings, harness.control, Metrics(), harness.directory)
    services = make_smtp(ctx)
    for s in services:
        harness.call(s.start())
    try:
        (smtp,) = services
        port = int(smtp.bound[0].rpartition(":")[2])  # type: ignore[attr-defined]
        r = idle(harness)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("carol@example.test", ["alice@example.test"], MESSAGE)
        seen, took = wait_for(r, b"EXISTS")
        assert b"* 1 EXISTS" in seen, (seen, took)
        done(r)
    finally:
        for s in services:
            harness.call(s.stop(1.0))


def test_outside_mta_delivery_wakes_idle(harness: Harness, no_polls: None) -> None:
    root = harness.alice.maildir
    ensure_maildir(root)
    r = idle(harness)
    deliver(root, MESSAGE)  # tmp/ then rename into new/, as Postfix's virtual does
    seen, _ = wait_for(r, b"EXISTS")
    assert b"* 1 EXISTS" in seen, seen
    # qmail-local's way: link() from tmp/ into new/, then unlink the tmp/ name
    tmp = root / "tmp" / "1700000000.P1Q1.outside"
    tmp.write_bytes(MESSAGE)
    os.link(tmp, root / "new" / tmp.name)
    tmp.unlink()
    seen, _ = wait_for(r, b"EXISTS")
    assert b"* 2 EXISTS" in seen, seen
    done(r)


@pytest.fixture
def pop3(harness: Harness, tmp_path: Path) -> Iterator[int]:
    settings = Settings(data_dir=tmp_path / "pop3data", hostname="pop.example.test",
                        pop3=Pop3Settings(listen=("127.0.0.1:0",), listen_tls=()),
                        auth=AuthSettings(failure_delay=0.0))
    ctx = Context(settings, harness.control, Metrics(), harness.directory)
    service = make_pop3(ctx)
    harness.call(service.start())
    yield next(p for k, _, p in service.addresses() if k == "pop3")
    harness.call(service.stop(1.0))


def test_pop3_dele_wakes_idle(harness: Harness, pop3: int, no_polls: None) -> None:
    root = harness.alice.maildir
    for _ in range(2):
        deliver(root, MESSAGE)
    r = idle(harness)
    p = poplib.POP3("127.0.0.1", pop3, timeout=10)
    p.user("alice")
    p.pass_(PASSWORD)
    assert p.stat()[0] == 2
    p.dele(1)
    p.quit()
    seen, _ = wait_for(r, b"EXPUNGE")
    assert b"* 1 EXPUNGE" in seen, seen
    done(r)


def test_expunge_and_flags_from_another_imap_session_wake_idle(
        harness: Harness, no_polls: None) -> None:
    root = harness.alice.maildir
    for _ in range(3):
        deliver(root, MESSAGE)
    r = idle(harness)
    other = login(harness, "127.0.0.3")
    other.select("INBOX")
    other.store("2", "+FLAGS", "(\\Flagged)")
    seen, _ = wait_for(r, b"\\Flagged")
    assert b"* 2 FETCH (FLAGS (" in seen and b"\\Flagged" in seen, seen
    other.store("1", "+FLAGS", "(\\Deleted)")
    other.expunge()
    other.logout()
    seen, _ = wait_for(r, b"EXPUNGE")
    assert b"* 1 EXPUNGE" in seen, seen
    done(r)


def test_noop_and_check_see_changes_without_idle(harness: Harness, no_polls: None) -> None:
    root = harness.alice.maildir
    r = Raw(harness.port)
    r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())
    assert b"* 0 EXISTS\r\n" in r.cmd(b"b", b"SELECT INBOX")
    deliver(root, MESSAGE)
    assert b"* 1 EXISTS\r\n" in r.cmd(b"c", b"NOOP")
    deliver(root, MESSAGE)
    assert b"* 2 EXISTS\r\n" in r.cmd(b"d", b"CHECK")
    other = login(harness, "127.0.0.3")
    other.select("INBOX")
    other.store("1", "+FLAGS", "(\\Deleted)")
    other.expunge()
    other.logout()
    assert b"* 1 EXPUNGE\r\n" in r.cmd(b"e", b"NOOP")
    r.cmd(b"f", b"LOGOUT")
    r.close()


def test_subfolder_idle_is_woken(harness: Harness, no_polls: None) -> None:
    c = login(harness, "127.0.0.3")
    assert c.create("Lists/Work")[0] == "OK"
    r = idle(harness, folder="Lists/Work")
    assert c.append("Lists/Work", None, None, MESSAGE)[0] == "OK"
    c.logout()
    seen, _ = wait_for(r, b"EXISTS")
    assert b"* 1 EXISTS" in seen, seen
    done(r)


# -- one watch per folder, shared, released --------------------------------------------


def test_watches_are_shared_per_folder_and_released(harness: Harness) -> None:
    assert counts(harness) == (0, 0)
    a1 = idle(harness)
    a2 = idle(harness, source="127.0.0.3")
    assert settle(harness, (1, 2)) == (1, 2)  # new/ and cur/ of alice's INBOX, once
    b = idle(harness, user="bob", password="bob-password")
    assert settle(harness, (2, 4)) == (2, 4)
    done(a1)
    assert settle(harness, (2, 4), 1.0) == (2, 4)  # a2 still idles on alice's INBOX
    done(a2)
    assert settle(harness, (1, 2)) == (1, 2)
    # a session that goes away without DONE releases its watch too
    b.close()
    assert settle(harness, (0, 0)) == (0, 0)


def test_a_change_wakes_only_the_sessions_of_that_folder(
        harness: Harness, monkeypatch: pytest.MonkeyPatch, no_polls: None) -> None:
    refreshed: list[str] = []
    original = imap_backend.Folder._refresh

    async def spy(self: imap_backend.Folder) -> Any:
        refreshed.append(str(self.maildir.root))
        return await original(self)

    monkeypatch.setattr(imap_backend.Folder, "_refresh", spy)
    bob_root = harness.mail / "example.test" / "bob"
    alice = idle(harness)
    bob = idle(harness, user="bob", password="bob-password", source="127.0.0.3")
    settle(harness, (2, 4))
    time.sleep(0.3)  # the first scan of each IDLE is done
    refreshed.clear()
    deliver(harness.alice.maildir, MESSAGE)
    seen, _ = wait_for(alice, b"EXISTS")
    assert b"* 1 EXISTS" in seen
    time.sleep(0.5)
    assert refreshed and str(bob_root) not in refreshed, refreshed
    done(alice)
    done(bob)


def test_an_unchanged_folder_is_not_looked_at(harness: Harness,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """pymap looked at every IDLE session's folder once a second; now only the kernel
    (or the 30 s safety net) wakes it. Fails on the polling code: 2-3 looks."""
    looks: list[float] = []
    original = imap_backend.Folder._signature

    def spy(self: imap_backend.Folder) -> Any:
        looks.append(time.monotonic())
        return original(self)

    monkeypatch.setattr(imap_backend.Folder, "_signature", spy)
    deliver(harness.alice.maildir, MESSAGE)
    r = idle(harness)
    time.sleep(3.0)
    assert len(looks) <= 1, looks  # the scan when the IDLE began
    done(r)


def test_safety_net_looks_do_not_rescan_an_unchanged_folder(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A look that finds the stamps unchanged costs a few stat() calls: no rescan of the
    folder in a thread, no round through pymap (before: one rescan per look)."""
    monkeypatch.setattr(notify, "SAFETY_NET_INTERVAL", 0.2)
    monkeypatch.setattr(imap_backend, "SIGNATURE_SETTLE_NS", 0)
    refreshes: list[float] = []
    looks: list[float] = []
    original_refresh = imap_backend.Folder._refresh
    original_signature = imap_backend.Folder._signature

    async def refresh_spy(self: imap_backend.Folder) -> Any:
        refreshes.append(time.monotonic())
        return await original_refresh(self)

    def signature_spy(self: imap_backend.Folder) -> Any:
        looks.append(time.monotonic())
        return original_signature(self)

    monkeypatch.setattr(imap_backend.Folder, "_refresh", refresh_spy)
    monkeypatch.setattr(imap_backend.Folder, "_signature", signature_spy)
    deliver(harness.alice.maildir, MESSAGE)
    r = idle(harness)
    time.sleep(0.3)
    refreshes.clear()
    looks.clear()
    time.sleep(2.0)
    assert len(looks) >= 4, looks  # the safety net did look
    assert refreshes == []
    deliver(harness.alice.maildir, MESSAGE)  # and a change still shows
    seen, _ = wait_for(r, b"EXISTS")
    assert b"* 2 EXISTS" in seen
    done(r)


# -- where inotify cannot help ------------------------------------------------------


def test_without_inotify_idle_polls_and_says_so_once(
        harness: Harness, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(notify, "INotify", None)  # as on a system without inotify
    monkeypatch.setattr(notify, "POLL_INTERVAL", 0.2)
    monkeypatch.setattr(notify, "SAFETY_NET_INTERVAL", NEVER)
    caplog.set_level(logging.WARNING, "relaygate.imap")
    a = idle(harness)
    b = idle(harness, user="bob", password="bob-password", source="127.0.0.3")
    deliver(harness.alice.maildir, MESSAGE)
    seen, _ = wait_for(a, b"EXISTS")
    assert b"* 1 EXISTS" in seen
    assert counts(harness) == (2, 0)
    warnings = [r.getMessage() for r in caplog.records if "inotify" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "every 0.2 s" in warnings[0]
    done(a)
    done(b)


def test_watch_limit_falls_back_to_polling(harness: Harness, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    real = notify.INotify

    class Limited(real):  # type: ignore[misc, valid-type]
        def add_watch(self, path: Any, mask: int) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(notify, "INotify", Limited)
    monkeypatch.setattr(notify, "POLL_INTERVAL", 0.2)
    monkeypatch.setattr(notify, "SAFETY_NET_INTERVAL", NEVER)
    caplog.set_level(logging.WARNING, "relaygate.imap")
    a = idle(harness)
    b = idle(harness, user="bob", password="bob-password", source="127.0.0.3")
    deliver(harness.alice.maildir, MESSAGE)
    seen, _ = wait_for(a, b"EXISTS")
    assert b"* 1 EXISTS" in seen
    warnings = [r.getMessage() for r in caplog.records if "watch limit" in r.getMessage()]
    assert len(warnings) == 1, warnings
    done(a)
    done(b)


def test_safety_net_sees_what_the_kernel_did_not_report(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Maildir on NFS changed by another host: no event ever comes."""
    monkeypatch.setattr(notify.Notifier, "_readable", lambda self: self._inotify.read(timeout=0))
    monkeypatch.setattr(notify, "SAFETY_NET_INTERVAL", 0.5)
    r = idle(harness)
    deliver(harness.alice.maildir, MESSAGE)
    seen, _ = wait_for(r, b"EXISTS")
    assert b"* 1 EXISTS" in seen
    done(r)


# -- the notifier alone ---------------------------------------------------------------


async def test_a_deleted_folder_wakes_its_sessions_and_they_poll(tmp_path: Path) -> None:
    root = tmp_path / "box"
    ensure_maildir(root)
    notifier = notify.Notifier()
    woken = asyncio.Event()
    sub = notifier.subscribe(str(root), woken.set)
    try:
        assert sub.live and notifier.watches == 2
        shutil.rmtree(root)
        await asyncio.wait_for(woken.wait(), 5)
        for _ in range(50):  # IN_IGNORED may come in a later read
            if not sub.live:
                break
            await asyncio.sleep(0.05)
        assert not sub.live
        sub.close()
        assert notifier.folders == 0 and notifier.watches == 0
    finally:
        notifier.close()


async def test_a_folder_reached_by_two_paths_shares_the_kernel_watch(tmp_path: Path) -> None:
    root = tmp_path / "box"
    ensure_maildir(root)
    (tmp_path / "link").symlink_to(root)
    notifier = notify.Notifier()
    woken: list[str] = []
    one = notifier.subscribe(str(root), lambda: woken.append("one"))
    two = notifier.subscribe(str(tmp_path / "link"), lambda: woken.append("two"))
    try:
        assert notifier.folders == 2 and notifier.watches == 2  # one wd per directory
        one.close()
        assert two.live and notifier.watches == 2
        deliver(root, MESSAGE)
        for _ in range(100):
            if woken:
                break
            await asyncio.sleep(0.02)
        assert woken and set(woken) == {"two"}
        two.close()
        assert notifier.watches == 0
    finally:
        notifier.close()
