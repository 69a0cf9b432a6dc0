"""The POP3 service over real loopback sockets with Python's poplib.

Every login test checks the relay window: after a successful login the store
holds a grant for exactly the client's address, with the right user; a failed
or throttled login grants nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import poplib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from argon2 import PasswordHasher
from pop3_harness import (
    BrokenStore,
    POP3From,
    Pop3Harness,
    POP3SSLFrom,
    raw_session,
    start_pop3,
)

from conftest import have_ipv6_loopback
from relaygate.config import AuthSettings
from relaygate.errors import ConfigError
from relaygate.interfaces import LoginResult
from relaygate.mail.maildir import deliver
from relaygate.servers.listeners import Listen

MSG1 = b"From: a@example.test\nSubject: one\n\nline 1\n.starts with a dot\nlast line\n"
MSG2 = b"From: b@example.test\r\nSubject: two\r\n\r\nbody two\r\n"
MSG3 = b"Subject: three\n\nno final newline"


@pytest.fixture
async def pop(tmp_path: Path) -> AsyncIterator[Pop3Harness]:
    h = await start_pop3(tmp_path)
    h.db.add("alice", "alice-pw", addresses=["al@example.test"])
    h.db.add("bob@example.test", "bob-pw")
    yield h
    await h.stop()


def client(h: Pop3Harness, source: str = "127.0.0.2") -> POP3From:
    return POP3From("127.0.0.1", h.port(), source)


async def test_login_opens_the_window_for_exactly_that_address(pop: Pop3Harness) -> None:
    def session() -> tuple[bytes, bytes]:
        c = client(pop, "127.0.0.2")
        c.user("alice")
        resp = c.pass_("alice-pw")
        stat = c.stat()
        c.quit()
        return resp, str(stat).encode()

    resp, _ = await asyncio.to_thread(session)
    assert resp.startswith(b"+OK maildrop has 0 messages")
    g = pop.grant("127.0.0.2")
    assert g is not None
    assert (g.user, g.domain, g.source) == ("alice", "example.test", "pop3")
    assert pop.grant("127.0.0.1") is None and pop.grant("127.0.0.3") is None
    assert pop.store.list(0) == [g]
    assert pop.metric("relaygate_logins_total", protocol="pop3", result="ok") == 1
    assert pop.metric("relaygate_windows_total", event="opened") == 1


async def test_wrong_password_and_unknown_user_never_grant(pop: Pop3Harness) -> None:
    def attempt(user: str, pw: str) -> str:
        c = client(pop, "127.0.0.3")
        c.user(user)
        try:
            c.pass_(pw)
        except poplib.error_proto as exc:
            return str(exc.args[0], "ascii")
        finally:
            c.close()
        return "ok"

    assert await asyncio.to_thread(attempt, "alice", "wrong") == \
        "-ERR [AUTH] Authentication failed"
    assert await asyncio.to_thread(attempt, "nobody", "alice-pw") == \
        "-ERR [AUTH] Authentication failed"
    assert pop.store.list(0) == []
    assert pop.metric("relaygate_logins_total", protocol="pop3", result="failed") == 2


async def test_login_by_primary_address_and_case(pop: Pop3Harness) -> None:
    def session() -> None:
        c = client(pop, "127.0.0.4")
        c.user("BOB@Example.Test")
        c.pass_("bob-pw")
        c.quit()

    await asyncio.to_thread(session)
    g = pop.grant("127.0.0.4")
    assert g is not None and g.user == "bob@example.test"


async def test_ipv6_client(tmp_path: Path) -> None:
    if not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    h = await start_pop3(tmp_path, listen=("[::1]:0",))
    h.db.add("alice", "alice-pw")
    try:
        def session() -> None:
            c = POP3From("::1", h.port(), "::1")
            c.user("alice")
            c.pass_("alice-pw")
            c.quit()

        await asyncio.to_thread(session)
        g = h.grant("::1")
        assert g is not None and g.user == "alice"
    finally:
        await h.stop()


async def test_throttling_refuses_even_the_right_password(tmp_path: Path) -> None:
    auth = AuthSettings(failure_delay=0.0, throttle_failures=2, throttle_window=60,
                        throttle_lockout=60)
    h = await start_pop3(tmp_path, auth=auth)
    h.db.add("alice", "alice-pw")
    h.db.add("carol", "carol-pw")
    try:
        def login(user: str, pw: str, source: str) -> bytes:
            return raw_session(h.port(), [f"USER {user}\r\n".encode(),
                                          f"PASS {pw}\r\n".encode(), b"QUIT\r\n"],
                               source=source)[2]

        assert (await asyncio.to_thread(login, "alice", "x", "127.0.0.2")).startswith(b"-ERR")
        assert (await asyncio.to_thread(login, "alice", "y", "127.0.0.2")).startswith(b"-ERR")
        # locked: the address (any user) and the account (any address)
        r = await asyncio.to_thread(login, "alice", "alice-pw", "127.0.0.2")
        assert r == b"-ERR [SYS/TEMP] Too many failed logins, try again later\r\n"
        r = await asyncio.to_thread(login, "carol", "carol-pw", "127.0.0.2")
        assert r.startswith(b"-ERR [SYS/TEMP]")
        r = await asyncio.to_thread(login, "alice", "alice-pw", "127.0.0.3")
        assert r.startswith(b"-ERR [SYS/TEMP]")
        assert h.store.list(0) == []
        # an unrelated user from an unrelated address still gets in
        r = await asyncio.to_thread(login, "carol", "carol-pw", "127.0.0.4")
        assert r.startswith(b"+OK")
        assert h.grant("127.0.0.4") is not None
        assert h.metric("relaygate_logins_total", protocol="pop3", result="throttled") == 3
    finally:
        await h.stop()


class SlowHasher(PasswordHasher):
    """A password check that takes a while, so concurrent logins overlap."""

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        time.sleep(0.02)
        return bool(super().verify(hash, password))


async def test_concurrent_guesses_over_pop3_are_refused(tmp_path: Path) -> None:
    # Twenty connections from one address send their PASS at once, the right
    # password last: at most the budget (5) is checked, the right one is
    # refused, and no relay window opens. Another user from elsewhere gets in.
    auth = AuthSettings(failure_delay=0.05, throttle_failures=5, throttle_window=60,
                        throttle_lockout=60)
    h = await start_pop3(tmp_path, auth=auth, pop3={"max_connections_per_ip": 50})
    h.db.add("alice", "alice-pw")
    h.db.add("carol", "carol-pw")
    h.db.hasher = SlowHasher(time_cost=1, memory_cost=8, parallelism=1)
    conns = []
    try:
        for _ in range(20):
            r, w = await asyncio.open_connection("127.0.0.1", h.port(),
                                                 local_addr=("127.0.0.2", 0))
            assert (await r.readline()).startswith(b"+OK")
            w.write(b"USER alice\r\n")
            assert (await r.readline()).startswith(b"+OK")
            conns.append((r, w))
        begun = 0
        authenticate = h.db.authenticate

        async def counted(*args: Any, **kw: Any) -> LoginResult:
            nonlocal begun
            begun += 1
            return await authenticate(*args, **kw)

        h.db.authenticate = counted  # type: ignore[method-assign]
        for i, (_, w) in enumerate(conns[:19]):
            w.write(f"PASS guess{i}\r\n".encode())
        while begun < 19:  # every guess has reached the server: now the right one
            await asyncio.sleep(0.001)
        conns[19][1].write(b"PASS alice-pw\r\n")
        carol = asyncio.to_thread(
            raw_session, h.port(), [b"USER carol\r\n", b"PASS carol-pw\r\n", b"QUIT\r\n"],
            "127.0.0.3")
        replies, carol_replies = await asyncio.gather(
            asyncio.gather(*(r.readline() for r, _ in conns)), carol)
        assert not any(line.startswith(b"+OK") for line in replies), replies
        assert replies[-1].startswith(b"-ERR [SYS/TEMP]")
        assert sum(line.startswith(b"-ERR [SYS/TEMP]") for line in replies) == 15
        assert h.grant("127.0.0.2") is None
        assert carol_replies[2].startswith(b"+OK")
        assert h.grant("127.0.0.3") is not None
    finally:
        for _, w in conns:
            w.close()
        await h.stop()


async def test_three_failures_end_the_connection(pop: Pop3Harness) -> None:
    replies = await asyncio.to_thread(
        raw_session, pop.port(),
        [b"USER alice\r\n", b"PASS 1\r\n", b"USER alice\r\n", b"PASS 2\r\n",
         b"USER alice\r\n", b"PASS 3\r\n", b"NOOP\r\n"], "127.0.0.5")
    assert replies[6].startswith(b"-ERR [AUTH]")
    assert replies[7] == b""  # closed


async def test_second_session_gets_in_use(pop: Pop3Harness) -> None:
    def sessions() -> str:
        a = client(pop, "127.0.0.2")
        a.user("alice")
        a.pass_("alice-pw")
        b = client(pop, "127.0.0.3")
        b.user("alice")
        try:
            b.pass_("alice-pw")
            return "second got in"
        except poplib.error_proto as exc:
            return str(exc.args[0], "ascii")
        finally:
            b.close()
            a.quit()

    assert await asyncio.to_thread(sessions) == \
        "-ERR [IN-USE] Mailbox is in use by another session"
    # after the first one quit, the mailbox is free again

    def again() -> bytes:
        c = client(pop, "127.0.0.3")
        c.user("alice")
        r = c.pass_("alice-pw")
        c.quit()
        return r

    assert (await asyncio.to_thread(again)).startswith(b"+OK")


async def test_quit_frees_the_mailbox_before_answering(
        pop: Pop3Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a client that logs in again right after QUIT must not get IN-USE."""
    import time

    from relaygate.mail.mailbox import MailboxLock

    real = MailboxLock.release

    def slow_release(self: MailboxLock) -> None:
        time.sleep(0.2)  # widen the race the benchmark hit under load
        real(self)

    monkeypatch.setattr(MailboxLock, "release", slow_release)

    def loop() -> list[bytes]:
        return [raw_session(pop.port(), [b"USER alice\r\n", b"PASS alice-pw\r\n",
                                         b"QUIT\r\n"])[2] for _ in range(5)]

    replies = await asyncio.to_thread(loop)
    assert all(r.startswith(b"+OK maildrop") for r in replies), set(replies)


async def test_maildir_state_follows_rfc1939(pop: Pop3Harness) -> None:
    box = pop.db.find_account("alice").maildir  # type: ignore[union-attr]
    p1 = deliver(box, MSG1)
    p2 = deliver(box, MSG2)
    p3 = deliver(box, MSG3)

    def first_session() -> tuple[list[bytes], int, list[bytes]]:
        c = client(pop)
        c.user("alice")
        c.pass_("alice-pw")
        count, _ = c.stat()
        _, lines, _ = c.retr(1)
        c.dele(2)
        # drop the connection without QUIT: nothing may be deleted
        listing = c.list()[1]
        c.sock.close()
        return lines, count, listing

    lines, count, listing = await asyncio.to_thread(first_session)
    assert count == 3
    assert lines == [b"From: a@example.test", b"Subject: one", b"", b"line 1",
                     b".starts with a dot", b"last line"]
    assert listing == [b"1 " + str(len(MSG1) + MSG1.count(b"\n")).encode(),
                       b"3 " + str(len(MSG3) + MSG3.count(b"\n") + 2).encode()]
    await asyncio.sleep(0.2)
    assert p2.exists() and p3.exists()  # the dropped session deleted nothing
    assert not p1.exists()  # RETR marked message 1 seen: new/ -> cur/ with S
    assert (box / "cur" / f"{p1.name}:2,S").exists()

    def second_session() -> tuple[int, list[bytes], list[bytes]]:
        c = client(pop)
        c.user("alice")
        c.pass_("alice-pw")
        uidl = c.uidl()[1]
        c.top(3, 0)  # TOP does not mark seen
        c.dele(2)
        c.dele(3)
        c.rset()  # undo both
        c.dele(2)
        count = c.stat()[0]
        c.quit()
        return count, uidl, []

    count, uidl, _ = await asyncio.to_thread(second_session)
    assert count == 2
    assert uidl == [b"1 " + p1.name.encode(), b"2 " + p2.name.encode(),
                    b"3 " + p3.name.encode()]
    assert not p2.exists()  # deleted in the UPDATE state
    assert p3.exists()  # RSET undid it; TOP left it in new/
    assert sorted(f.name for f in (box / "cur").iterdir()) == [f"{p1.name}:2,S"]


async def test_retr_bytes_on_the_wire(pop: Pop3Harness) -> None:
    box = pop.db.find_account("alice").maildir  # type: ignore[union-attr]
    deliver(box, MSG3)
    deliver(box, b"Subject: dots\n\n.\n..\n.x\n")

    def wire() -> tuple[bytes, bytes, bytes]:
        with socket.create_connection(("127.0.0.1", pop.port()), 10,
                                      source_address=("127.0.0.2", 0)) as s:
            s.sendall(b"USER alice\r\nPASS alice-pw\r\nLIST 1\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n")
            data = b""
            while not data.endswith(b"signing off\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        parts = data.split(b"\r\n+OK ")
        return parts[3], parts[4], parts[5]

    list1, retr1, retr2 = await asyncio.to_thread(wire)
    size = len(MSG3) + MSG3.count(b"\n") + 2
    assert list1 == f"1 {size}".encode()
    assert retr1 == f"{size} octets\r\nSubject: three\r\n\r\nno final newline\r\n.".encode()
    assert retr2.endswith(b"octets\r\nSubject: dots\r\n\r\n..\r\n...\r\n..x\r\n.")


async def test_delivered_messages_appear(pop: Pop3Harness) -> None:
    account = pop.db.find_recipient("al@example.test")
    assert account is not None
    deliver(account.maildir, b"Subject: via alias\r\n\r\nhello\r\n")

    def fetch() -> list[bytes]:
        c = client(pop)
        c.user("alice")
        c.pass_("alice-pw")
        lines = c.retr(1)[1]
        c.quit()
        return lines

    assert await asyncio.to_thread(fetch) == [b"Subject: via alias", b"", b"hello"]


async def test_apop_login(tmp_path: Path) -> None:
    h = await start_pop3(tmp_path)
    h.db.add("alice", "alice-pw", apop=True)
    secret = h.db.apop_secret("alice")
    assert secret is not None
    try:
        def session() -> bytes:
            c = client(h, "127.0.0.6")
            r = c.apop("alice", secret)
            c.quit()
            return r

        assert (await asyncio.to_thread(session)).startswith(b"+OK")
        g = h.grant("127.0.0.6")
        assert g is not None and g.user == "alice"

        def wrong() -> str:
            c = client(h, "127.0.0.7")
            try:
                c.apop("alice", "alice-pw")  # the password is not the APOP secret
                return "ok"
            except poplib.error_proto as exc:
                return str(exc.args[0], "ascii")
            finally:
                c.close()

        assert (await asyncio.to_thread(wrong)).startswith("-ERR [AUTH]")
        assert h.grant("127.0.0.7") is None
        # the digest is MD5(timestamp + secret)
        greeting = await asyncio.to_thread(raw_session, h.port(), [])
        stamp = greeting[0].split(b" ")[-1].strip()
        assert stamp.startswith(b"<") and stamp.endswith(b">")
        digest = hashlib.md5(stamp + secret.encode()).hexdigest()
        assert len(digest) == 32
    finally:
        await h.stop()


async def test_auth_plain(pop: Pop3Harness) -> None:
    ir = base64.b64encode(b"\0alice\0alice-pw")
    replies = await asyncio.to_thread(
        raw_session, pop.port(), [b"AUTH PLAIN " + ir + b"\r\n", b"QUIT\r\n"], "127.0.0.8")
    assert replies[1].startswith(b"+OK maildrop has")
    assert pop.grant("127.0.0.8") is not None
    replies = await asyncio.to_thread(
        raw_session, pop.port(),
        [b"AUTH PLAIN\r\n", base64.b64encode(b"\0alice\0nope") + b"\r\n"], "127.0.0.9")
    assert replies[1] == b"+ \r\n" and replies[2].startswith(b"-ERR [AUTH]")
    assert pop.grant("127.0.0.9") is None


async def test_store_failure_does_not_fail_the_login(tmp_path: Path) -> None:
    h = await start_pop3(tmp_path, store=BrokenStore())
    h.db.add("alice", "alice-pw")
    try:
        def session() -> bytes:
            c = client(h)
            c.user("alice")
            r = c.pass_("alice-pw")
            c.quit()
            return r

        assert (await asyncio.to_thread(session)).startswith(b"+OK")
        assert h.metric("relaygate_windows_total", event="opened") == 0
        assert h.metric("relaygate_windows_total", event="failed") == 1  # as IMAP counts it
    finally:
        await h.stop()


async def test_user_database_failure_is_a_temporary_error(pop: Pop3Harness) -> None:
    pop.db._db.close()
    replies = await asyncio.to_thread(
        raw_session, pop.port(), [b"USER alice\r\n", b"PASS alice-pw\r\n"])
    assert replies[2] == b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n"
    assert pop.store.list(0) == []


async def test_idle_timeout(tmp_path: Path) -> None:
    h = await start_pop3(tmp_path, pop3={"idle_timeout": 0.3})
    try:
        def idle() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", h.port()), 10) as s:
                f = s.makefile("rb")
                return [f.readline(), f.readline(), f.readline()]

        lines = await asyncio.to_thread(idle)
        assert lines[0].startswith(b"+OK")
        assert lines[1] == b"-ERR Autologout: idle timeout\r\n"
        assert lines[2] == b""
    finally:
        await h.stop()


async def test_bad_commands_disconnect(pop: Pop3Harness) -> None:
    replies = await asyncio.to_thread(
        raw_session, pop.port(), [b"HELO x\r\n"] * 9 + [b"XYZZY\r\n", b"NOOP\r\n"])
    assert all(r == b"-ERR Unknown command\r\n" for r in replies[1:10])
    assert replies[10] == b"-ERR Unknown command\r\n"
    assert replies[11] == b"-ERR Too many bad commands, closing\r\n"


async def test_long_line(pop: Pop3Harness) -> None:
    replies = await asyncio.to_thread(
        raw_session, pop.port(), [b"USER " + b"a" * 100_000 + b"\r\n", b"CAPA\r\n"])
    assert replies[1] == b"-ERR Line too long\r\n"
    assert replies[2].startswith(b"+OK Capability")


async def test_connections_per_address_are_limited(tmp_path: Path) -> None:
    h = await start_pop3(tmp_path, pop3={"max_connections_per_ip": 2})
    try:
        def three() -> list[bytes]:
            socks = [socket.create_connection(("127.0.0.1", h.port()), 10,
                                              source_address=("127.0.0.2", 0))
                     for _ in range(3)]
            try:
                return [s.makefile("rb").readline() for s in socks]
            finally:
                for s in socks:
                    s.close()

        lines = await asyncio.to_thread(three)
        assert lines[0].startswith(b"+OK") and lines[1].startswith(b"+OK")
        assert lines[2].startswith(b"-ERR [SYS/TEMP] Too many connections")
    finally:
        await h.stop()


async def test_connection_limit_counts_ipv6_per_network(pop: Pop3Harness) -> None:
    # Loopback has only ::1, so the key is checked directly: one /64, one count.
    key = pop.service.limiter.key
    assert key("2001:db8:1:2::1") == key("2001:db8:1:2:ffff::7") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") != key("2001:db8:1:2::1")
    assert key("::ffff:192.0.2.1") == key("192.0.2.1") == "192.0.2.1"
    assert key(None) == "unix"


async def test_stop_cuts_idle_sessions_and_deletes_nothing(tmp_path: Path) -> None:
    h = await start_pop3(tmp_path)
    h.db.add("alice", "alice-pw")
    p = deliver(h.db.find_account("alice").maildir, MSG2)  # type: ignore[union-attr]
    c = await asyncio.to_thread(client, h)
    await asyncio.to_thread(c.user, "alice")
    await asyncio.to_thread(c.pass_, "alice-pw")
    await asyncio.to_thread(c.dele, 1)
    await h.stop()
    assert p.exists()
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        await asyncio.to_thread(c.quit)
    c.close()


def test_plaintext_policy_of_listeners(tmp_path: Path) -> None:
    """No non-loopback traffic here: check the decision itself (the listener's loopback
    flag is what binding decides from the bound address, see servers/listeners.py)."""
    from relaygate.config import Settings
    from relaygate.context import Context
    from relaygate.control import RelayControl
    from relaygate.mail.directory import StaticDirectory
    from relaygate.metrics import Metrics
    from relaygate.servers.listeners import Listener, loopback_sockname
    from relaygate.servers.pop3 import Pop3Service
    from relaygate.stores.memory import MemoryStore

    def bound(listen: Listen, sockname: object) -> Listener:
        listener = Listener("pop3", listen)
        listener.loopback = loopback_sockname(sockname)
        return listener

    def cfg(allow: bool, listener: Listener, ip: str | None) -> bool:
        s = Settings(data_dir=tmp_path, auth=AuthSettings(allow_plaintext=allow))
        svc = Pop3Service(Context(s, RelayControl(MemoryStore()), Metrics(),
                                  StaticDirectory()))
        return svc._config(listener, ip, False).plaintext_without_tls

    public = bound(Listen("192.0.2.1", 110), ("192.0.2.1", 110))
    assert not cfg(False, public, "198.51.100.7")
    assert cfg(True, public, "198.51.100.7")
    assert cfg(False, public, "127.0.0.1")  # a loopback client never crosses a network
    assert cfg(False, bound(Listen("127.0.0.1", 110), ("127.0.0.1", 110)), "127.0.0.5")
    assert cfg(False, bound(Listen(None, None, "/run/pop3.sock"), "/run/pop3.sock"), None)
    # a host *name* that looks like a loopback address is judged by what it bound
    assert not cfg(False, bound(Listen("127.0.0.1.nip.io", 110), ("192.0.2.1", 110)),
                   "198.51.100.7")


# -- TLS ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost", "mx.example.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    return cert_path, key_path


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_stls(tmp_path: Path, ca: trustme.CA) -> None:
    h = await start_pop3(tmp_path, tls=tls_files(ca, tmp_path))
    h.db.add("alice", "alice-pw")
    try:
        def session() -> tuple[dict[str, list[str]], dict[str, list[str]], str]:
            c = client(h, "127.0.0.2")
            before = c.capa()
            c.stls(client_context(ca))
            after = c.capa()
            c.user("alice")
            c.pass_("alice-pw")
            version = c.sock.version()
            c.quit()
            return before, after, version

        before, after, version = await asyncio.to_thread(session)
        assert "STLS" in before and "STLS" not in after
        assert version in ("TLSv1.2", "TLSv1.3")
        g = h.grant("127.0.0.2")
        assert g is not None and g.user == "alice"
    finally:
        await h.stop()


async def test_stls_repeatedly(tmp_path: Path, ca: trustme.CA) -> None:
    """Regression: the ClientHello must never be read as plaintext and dropped.

    It did when the server yielded between sending STLS's +OK and starting TLS
    (about half of the handshakes then hung).
    """
    h = await start_pop3(tmp_path, tls=tls_files(ca, tmp_path))
    h.db.add("alice", "alice-pw")
    context = client_context(ca)
    try:
        def session() -> None:
            c = POP3From("127.0.0.1", h.port(), "127.0.0.2", timeout=5)
            c.stls(context)
            c.user("alice")
            c.pass_("alice-pw")
            c.quit()

        for _ in range(15):
            await asyncio.to_thread(session)
    finally:
        await h.stop()


async def test_stls_drops_plaintext_sent_behind_it(tmp_path: Path, ca: trustme.CA) -> None:
    h = await start_pop3(tmp_path, tls=tls_files(ca, tmp_path))
    h.db.add("alice", "alice-pw")
    try:
        def inject() -> bytes:
            raw = socket.create_connection(("127.0.0.1", h.port()), 10,
                                           source_address=("127.0.0.2", 0))
            f = raw.makefile("rb")
            f.readline()
            raw.sendall(b"STLS\r\nUSER alice\r\nPASS alice-pw\r\n")
            assert f.readline() == b"+OK Begin TLS negotiation\r\n"
            tls = client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(b"STAT\r\n")
            reply = tls.makefile("rb").readline()
            tls.close()
            return reply

        reply = await asyncio.to_thread(inject)
        assert reply == b"-ERR Command not valid in this state\r\n"
        assert h.store.list(0) == []
    finally:
        await h.stop()


async def test_implicit_tls(tmp_path: Path, ca: trustme.CA) -> None:
    h = await start_pop3(tmp_path, tls=tls_files(ca, tmp_path), listen_tls=("127.0.0.1:0",))
    h.db.add("alice", "alice-pw")
    try:
        assert any(line.startswith("pop3s 127.0.0.1:") for line in h.service.listeners())

        def session() -> dict[str, list[str]]:
            c = POP3SSLFrom("127.0.0.1", h.port("pop3s"), "127.0.0.3", client_context(ca))
            caps = c.capa()
            c.user("alice")
            c.pass_("alice-pw")
            c.quit()
            return caps

        caps = await asyncio.to_thread(session)
        assert "STLS" not in caps and "USER" in caps
        g = h.grant("127.0.0.3")
        assert g is not None and g.user == "alice"
    finally:
        await h.stop()


async def test_no_tls_listener_without_a_certificate(tmp_path: Path) -> None:
    h = await start_pop3(tmp_path, listen_tls=("127.0.0.1:0",))
    try:
        assert [k for k, _, _ in h.service.addresses()] == ["pop3"]
        caps = await asyncio.to_thread(lambda: client(h).capa())
        assert "STLS" not in caps
    finally:
        await h.stop()


async def test_bad_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="cannot load the TLS certificate") as info:
        await start_pop3(tmp_path, tls=(bad, bad))
    assert info.value.source == "tls.cert" and info.value.value == str(bad)


async def test_reload_swaps_the_certificate_and_keeps_it_on_error(tmp_path: Path) -> None:
    # pop3d's SIGHUP reloads the context every listener shares (servers/listeners.py).
    from relaygate.servers.listeners import reload_certificate

    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = tls_files(old_ca, tmp_path)
    h = await start_pop3(tmp_path, tls=(cert, key))

    def handshake(ca: trustme.CA) -> None:
        c = client(h)
        c.stls(client_context(ca))
        c.quit()

    try:
        await asyncio.to_thread(handshake, old_ca)
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        new_cert, new_key = tls_files(new_ca, fresh)
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        assert h.service.ctx.ssl_context is h.service.ssl_context is not None
        assert reload_certificate(h.service.ssl_context, h.service.settings)
        await asyncio.to_thread(handshake, new_ca)
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(handshake, old_ca)
        cert.write_text("garbage\n")
        # logged, the current certificate stays
        assert not reload_certificate(h.service.ssl_context, h.service.settings)
        await asyncio.to_thread(handshake, new_ca)
    finally:
        await h.stop()


async def test_retr_reads_ahead_in_one_thread_hop_and_renames_in_one(
        pop: Pop3Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from relaygate.servers.pop3 import Pop3Service

    box = pop.db.find_account("alice").maildir  # type: ignore[union-attr]
    paths = [deliver(box, MSG1 + b"message %d\n" % i) for i in range(5)]
    hops: list[str] = []
    real = Pop3Service._hop

    def counting(self: Pop3Service, func: Any, /, *args: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return real(self, func, *args)

    def session() -> list[list[bytes]]:
        c = client(pop)
        c.user("alice")
        c.pass_("alice-pw")
        hops.clear()
        out = [c.retr(i)[1] for i in range(1, 6)]
        c.dele(5)
        assert all(p.exists() for p in paths)  # nothing renamed before QUIT
        c.quit()
        return out

    monkeypatch.setattr(Pop3Service, "_hop", counting)
    bodies = await asyncio.to_thread(session)
    assert [b[-1] for b in bodies] == [b"message %d" % i for i in range(5)]
    # one read (RETR 1 reads 2-5 ahead), one hop for four renames and the deletion,
    # one to free the lock
    assert hops == ["_read_message", "apply", "release"]
    assert sorted(f.name for f in (box / "cur").iterdir()) == sorted(
        f"{p.name}:2,S" for p in paths[:4])
    assert list((box / "new").iterdir()) == []


async def test_large_message_streams_in_pieces(pop: Pop3Harness,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import relaygate.servers.pop3 as pop3_module
    from relaygate.protocols.pop3 import encode_message

    monkeypatch.setattr(pop3_module, "READ_WHOLE", 100)
    monkeypatch.setattr(pop3_module, "SEND_CHUNK", 37)
    box = pop.db.find_account("alice").maildir  # type: ignore[union-attr]
    body = b"Subject: big\n\n" + b"".join(b".line %d\r\n" % i for i in range(200)) + b"end"
    deliver(box, body)

    def wire() -> bytes:
        with socket.create_connection(("127.0.0.1", pop.port()), 10,
                                      source_address=("127.0.0.2", 0)) as s:
            s.sendall(b"USER alice\r\nPASS alice-pw\r\nRETR 1\r\nTOP 1 2\r\nQUIT\r\n")
            data = b""
            while not data.endswith(b"signing off\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data

    data = await asyncio.to_thread(wire)
    retr = data.split(b" octets\r\n", 1)[1]
    assert retr.startswith(encode_message(body))
    top = retr[len(encode_message(body)):]
    assert top.startswith(b"+OK ")
    assert top.split(b"\r\n", 1)[1].startswith(
        b"Subject: big\r\n\r\n..line 0\r\n..line 1\r\n.\r\n+OK ")
