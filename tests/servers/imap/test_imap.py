"""IMAP server (relaygate.servers.imap.service): logins open windows, raw bytes, limits, TLS.

Every test runs the real service on loopback in a background thread (its own
asyncio loop, as in ``relaygate imapd``) and talks to it with imaplib or raw
sockets bound to 127.0.0.2 / ::1. The harness here is also used by
test_imap_clients.py and test_imap_fuzz.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import have_ipv6_loopback
from relaygate.config import AuthSettings, ImapSettings, Settings, TlsSettings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.errors import StoreError
from relaygate.grants import Grant
from relaygate.interfaces import Account, LoginResult
from relaygate.mail.directory import StaticDirectory
from relaygate.mail.maildir import deliver, ensure_maildir
from relaygate.metrics import Metrics
from relaygate.servers.imap import backend as imap_backend
from relaygate.servers.imap import connection as imap_conn
from relaygate.servers.imap import service as imap_mod
from relaygate.stores.memory import MemoryStore

PASSWORD = "correct horse battery"


class ErrorCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Harness:
    """One IMAP service on 127.0.0.1 (and ::1) in a thread, with a memory store."""

    def __init__(self, tmp: Path, *, directory: Any = None, expiry: float = 900.0,
                 imap: dict[str, Any] | None = None, auth: AuthSettings | None = None,
                 tls: tuple[Path, Path] | None = None, public: bool = False,
                 ipv6: bool = False, store: Any = None) -> None:
        self.tmp = tmp
        self.mail = tmp / "mail"
        self.alice = Account("alice", "example.test", self.mail / "example.test" / "alice",
                             ("alice@example.test",))
        if directory is None:
            directory = StaticDirectory()
            directory.add(self.alice, PASSWORD)
            directory.add(Account("bob", "example.test", self.mail / "example.test" / "bob"),
                          "bob-password")
        self.directory = directory
        self.store = store if store is not None else MemoryStore()
        self.control = RelayControl(self.store, expiry=expiry)
        self.metrics = Metrics()
        listen = ["127.0.0.1:0"] + (["[::1]:0"] if ipv6 else [])
        imap_settings: dict[str, Any] = {"listen": tuple(listen), "listen_tls": ("127.0.0.1:0",)}
        imap_settings.update(imap or {})
        self.settings = Settings(
            data_dir=tmp / "data", hostname="imap.example.test",
            imap=ImapSettings(**imap_settings), auth=auth or AuthSettings(),
            tls=TlsSettings(*tls) if tls else TlsSettings())
        self.ctx = Context(self.settings, self.control, self.metrics, directory)
        self.service = imap_mod.make_service(self.ctx)
        self.public = public
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.errors = ErrorCollector()
        self.loop_errors: list[dict[str, Any]] = []

    def start(self) -> Harness:
        logging.getLogger("relaygate.imap").addHandler(self.errors)
        self.loop.set_exception_handler(lambda loop, c: self.loop_errors.append(c))
        self.thread.start()
        self.call(self.service.start())
        if self.public:
            # loopback listeners the server must treat as public (no plaintext logins)
            for listener in self.service._listeners:
                if listener.kind == "imap":
                    listener.loopback = False
        ports = self.service.bound_ports()
        n_plain = len(self.service.plain)
        self.ports = ports[:n_plain]
        self.port = ports[0]
        self.tls_port = ports[n_plain] if len(ports) > n_plain else None
        return self

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.service.stop(2.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            logging.getLogger("relaygate.imap").removeHandler(self.errors)

    def grant(self, ip: str) -> Grant | None:
        return self.store.get(ip, time.time())

    def count(self, metric: str, *labels: str) -> float:
        value = getattr(self.metrics, metric).labels(*labels)._value.get()
        return float(value)

    def assert_clean(self) -> None:
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]
        assert not self.loop_errors, self.loop_errors


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, ipv6=have_ipv6_loopback()).start()
    yield h
    h.stop()
    h.assert_clean()


# -- clients -------------------------------------------------------------------


class BoundIMAP(imaplib.IMAP4):
    """imaplib from a chosen source address (127.0.0.2 acts as another client)."""

    def __init__(self, host: str, port: int, source: str, timeout: float = 10.0) -> None:
        self.source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


class BoundIMAPSSL(imaplib.IMAP4_SSL):
    def __init__(self, host: str, port: int, source: str, context: ssl.SSLContext) -> None:
        self.source = source
        super().__init__(host, port, ssl_context=context, timeout=10.0)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))
        wrapped: socket.socket = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        return wrapped


class Raw:
    """A line-oriented raw IMAP client for protocol-level tests."""

    def __init__(self, port: int, source: str = "127.0.0.2", host: str = "127.0.0.1",
                 timeout: float = 10.0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline()

    def until_tagged(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the tagged reply (b"" lines mean EOF)."""
        out = []
        while True:
            line = self.line()
            out.append(line)
            if not line or line.startswith(tag + b" "):
                return out
            m = re.search(rb"\{(\d+)\}\r\n$", line)
            if m:
                out.append(self.file.read(int(m.group(1))))

    def cmd(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until_tagged(tag)

    def closed(self) -> bool:
        try:
            return self.file.read() == b"" or True
        except (ConnectionError, TimeoutError):
            return False

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def login(h: Harness, source: str = "127.0.0.2", host: str = "127.0.0.1") -> BoundIMAP:
    c = BoundIMAP(host, h.port if host == "127.0.0.1" else h.ports[1], source)
    c.login("alice", PASSWORD)
    return c


# -- unit ------------------------------------------------------------------------


def test_to_crlf() -> None:
    assert imap_backend.to_crlf(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n"
    assert imap_backend.to_crlf(b"no newline") == b"no newline"
    assert imap_backend.to_crlf(b"\r\n\n\r") == b"\r\n\r\n\r"


def test_make_service_needs_directory(tmp_path: Path) -> None:
    from relaygate.errors import ConfigError

    ctx = Context(Settings(data_dir=tmp_path), RelayControl(MemoryStore()), Metrics(), None)
    with pytest.raises(ConfigError):
        imap_mod.make_service(ctx)


def test_listeners_without_tls_skip_implicit(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.service.listeners() == ["imap 127.0.0.1:0"]


# -- login opens the window ------------------------------------------------------


def test_login_opens_window_for_exactly_that_address(harness: Harness) -> None:
    c = login(harness, "127.0.0.2")
    g = harness.grant("127.0.0.2")
    assert g is not None and g.user == "alice" and g.domain == "example.test"
    assert g.source == "imap"
    assert harness.grant("127.0.0.1") is None and harness.grant("127.0.0.3") is None
    assert harness.count("logins", "imap", "ok") == 1
    assert harness.count("windows", "opened") == 1
    c.logout()


def test_window_opened_is_logged_with_its_length(harness: Harness,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    # The same event line as POP3's: ``expires`` is the window's length in
    # seconds, not an epoch timestamp.
    with caplog.at_level(logging.INFO, logger="relaygate.events"):
        login(harness, "127.0.0.2").logout()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("window.opened")]
    assert len(lines) == 1, lines
    assert "ip=127.0.0.2" in lines[0] and "source=imap" in lines[0]
    assert re.search(r"\bexpires=900\b", lines[0]), lines[0]


def test_login_from_ipv6_loopback(harness: Harness) -> None:
    if not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    c = login(harness, "::1", host="::1")
    g = harness.grant("::1")
    assert g is not None and g.user == "alice"
    assert harness.grant("127.0.0.1") is None
    c.logout()


def test_wrong_password_never_grants(harness: Harness) -> None:
    c = BoundIMAP("127.0.0.1", harness.port, "127.0.0.3")
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        c.login("alice", "wrong")
    with pytest.raises(imaplib.IMAP4.error):
        c.login("nobody", PASSWORD)
    assert harness.grant("127.0.0.3") is None
    assert harness.count("logins", "imap", "failed") == 2
    assert harness.count("logins", "imap", "ok") == 0


def test_authenticate_plain_opens_window(harness: Harness) -> None:
    c = BoundIMAP("127.0.0.1", harness.port, "127.0.0.4")
    typ, _ = c.authenticate("PLAIN", lambda _: b"\0alice\0" + PASSWORD.encode())
    assert typ == "OK"
    g = harness.grant("127.0.0.4")
    assert g is not None and g.user == "alice"
    c.logout()


def test_authenticate_login_mechanism_and_wrong_authzid(harness: Harness) -> None:
    c = BoundIMAP("127.0.0.1", harness.port, "127.0.0.5")
    with pytest.raises(imaplib.IMAP4.error, match="AUTHORIZATIONFAILED"):
        c.authenticate("PLAIN", lambda _: b"bob\0alice\0" + PASSWORD.encode())
    assert harness.grant("127.0.0.5") is None
    answers = iter([b"alice", PASSWORD.encode()])
    typ, _ = c.authenticate("LOGIN", lambda _: next(answers))
    assert typ == "OK"
    assert harness.grant("127.0.0.5") is not None
    c.logout()


def test_second_authenticate_is_refused(harness: Harness) -> None:
    r = Raw(harness.port)
    assert r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())[-1].startswith(b"a OK")
    import base64
    plain = base64.b64encode(b"\0bob\0bob-password")
    r.send(b"b AUTHENTICATE PLAIN\r\n")
    reply = r.line()
    if reply.startswith(b"+"):
        r.send(plain + b"\r\n")
        reply = r.until_tagged(b"b")[-1]
    assert reply.startswith(b"b BAD"), reply
    g = harness.grant("127.0.0.2")
    assert g is not None and g.user == "alice"
    r.close()


class ThrottledDirectory(StaticDirectory):
    """Says "throttled" for every login, right password or not."""

    async def authenticate(self, login: str, password: str, ip: str, *,
                           service: str | None = None) -> LoginResult:
        result = await super().authenticate(login, password, ip, service=service)
        return LoginResult(result.account, throttled=True)


def test_throttled_login_never_grants_even_with_right_password(tmp_path: Path) -> None:
    d = ThrottledDirectory()
    h = Harness(tmp_path, directory=d)
    d.add(h.alice, PASSWORD)
    h.start()
    try:
        c = BoundIMAP("127.0.0.1", h.port, "127.0.0.2")
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
            c.login("alice", PASSWORD)
        assert h.grant("127.0.0.2") is None
        assert h.count("logins", "imap", "throttled") == 1
        assert h.count("windows", "opened") == 0
    finally:
        h.stop()
    h.assert_clean()


def test_userdb_throttling_integration(tmp_path: Path) -> None:
    """The real user database: after failures, the right password is refused, no window."""
    from argon2 import PasswordHasher

    from relaygate.mail.accounts.db import UserDB

    auth = AuthSettings(throttle_failures=2, throttle_window=60, throttle_lockout=60,
                        failure_delay=0.01)
    db = UserDB(tmp_path / "users.db", auth, tmp_path,
                hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    db.add("carol@example.test", PASSWORD)
    h = Harness(tmp_path, directory=db, auth=auth).start()
    try:
        c = BoundIMAP("127.0.0.1", h.port, "127.0.0.6")
        c.login("carol@example.test", PASSWORD)
        g = h.grant("127.0.0.6")
        assert g is not None and g.user == "carol@example.test"
        c.logout()
        c = BoundIMAP("127.0.0.1", h.port, "127.0.0.7")
        for _ in range(2):
            with pytest.raises(imaplib.IMAP4.error):
                c.login("carol@example.test", "wrong")
        c = BoundIMAP("127.0.0.1", h.port, "127.0.0.7")
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
            c.login("carol@example.test", PASSWORD)
        assert h.grant("127.0.0.7") is None
    finally:
        h.stop()
        db.close()
    h.assert_clean()


class BrokenStore(MemoryStore):
    def put(self, grant: Grant) -> None:
        raise StoreError("store down")


def test_store_error_does_not_fail_login(tmp_path: Path) -> None:
    h = Harness(tmp_path, store=BrokenStore()).start()
    try:
        c = BoundIMAP("127.0.0.1", h.port, "127.0.0.2")
        typ, _ = c.login("alice", PASSWORD)
        assert typ == "OK"
        assert c.select("INBOX")[0] == "OK"
        assert h.count("windows", "failed") == 1
        c.logout()
    finally:
        h.stop()
    # the StoreError is logged as a warning, not an error
    h.assert_clean()


class BuggyStore(MemoryStore):
    def put(self, grant: Grant) -> None:
        raise RuntimeError("a bug in the store")


def test_store_bug_does_not_fail_login(tmp_path: Path) -> None:
    """Not only a StoreError: whatever the store raises, the login stands (POP3 and IMAP
    share one policy, servers/listeners.py open_window_after_login)."""
    h = Harness(tmp_path, store=BuggyStore()).start()
    try:
        c = BoundIMAP("127.0.0.1", h.port, "127.0.0.2")
        typ, _ = c.login("alice", PASSWORD)
        assert typ == "OK"
        assert c.select("INBOX")[0] == "OK"
        assert h.count("windows", "failed") == 1
        c.logout()
    finally:
        h.stop()


def test_idle_session_refreshes_window(tmp_path: Path) -> None:
    h = Harness(tmp_path, expiry=0.6).start()  # refresh every 0.2 s
    try:
        r = Raw(h.port, "127.0.0.2")
        assert r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())[-1].startswith(b"a OK")
        assert r.cmd(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")
        r.send(b"c IDLE\r\n")
        assert r.line().startswith(b"+ ")
        time.sleep(1.5)  # 2.5 expiries: without refreshes the window would be gone
        g = h.grant("127.0.0.2")
        assert g is not None and g.user == "alice"
        assert h.count("windows", "refreshed") >= 3
        r.send(b"DONE\r\n")
        assert r.until_tagged(b"c")[-1].startswith(b"c OK")
        r.cmd(b"d", b"LOGOUT")
        r.close()
        time.sleep(0.3)
        before = h.count("windows", "refreshed")
        time.sleep(0.5)
        assert h.count("windows", "refreshed") == before  # refresher stopped at disconnect
    finally:
        h.stop()
    h.assert_clean()


# -- messages: the same Maildir, the exact bytes ---------------------------------


LF_MESSAGE = (b"From: Carol <carol@example.test>\nTo: alice@example.test\n"
              b"Subject: bare LF\nMessage-ID: <1@example.test>\n\nline one\nline two\n")
CRLF_MESSAGE = (b"From: dave@example.test\r\nTo: alice@example.test\r\nSubject: crlf\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n\r\nbody \xc3\xa9\r\n")
MULTIPART = (b"From: e@example.test\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
             b"Content-Type: text/plain\r\n\r\nhello\r\n--XX\r\n"
             b"Content-Type: application/octet-stream\r\n\r\nAAAA\r\n--XX--\r\n")


def _text(data: list[Any]) -> bytes:
    """imaplib response data flattened to bytes (literals inlined)."""
    out = b""
    for item in data:
        if isinstance(item, tuple):
            out += b"".join(item)
        elif isinstance(item, bytes):
            out += item
    return out


def _fetch_one(c: imaplib.IMAP4, seq: str, what: str) -> tuple[bytes, bytes]:
    typ, data = c.fetch(seq, what)
    assert typ == "OK", data
    item = data[0]
    assert isinstance(item, tuple)
    return item[0], item[1]


def test_delivered_messages_have_exact_bytes_and_size(harness: Harness) -> None:
    box = harness.alice.maildir
    deliver(box, LF_MESSAGE)
    deliver(box, CRLF_MESSAGE)
    deliver(box, b"Subject: no final newline\r\n\r\nlast")
    c = login(harness)
    assert c.select("INBOX") == ("OK", [b"3"])
    expected = [imap_backend.to_crlf(LF_MESSAGE), CRLF_MESSAGE,
                b"Subject: no final newline\r\n\r\nlast"]
    for i, raw in enumerate(expected, 1):
        head, body = _fetch_one(c, str(i), "(RFC822.SIZE BODY.PEEK[])")
        assert body == raw
        assert f"RFC822.SIZE {len(raw)} ".encode() in head
    # sections and structure come from the same bytes
    _, header = _fetch_one(c, "1", "(BODY.PEEK[HEADER])")
    assert header == imap_backend.to_crlf(LF_MESSAGE).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    _, text = _fetch_one(c, "1", "(BODY.PEEK[TEXT])")
    assert text == b"line one\r\nline two\r\n"
    envelope = _text(c.fetch("1", "(ENVELOPE)")[1])
    assert b'"bare LF"' in envelope and b"<1@example.test>" in envelope
    structure = _text(c.fetch("2", "(BODYSTRUCTURE)")[1])
    assert b'"text" "plain"' in structure.lower()
    # PEEK did not set \Seen; BODY[] does
    assert b"\\Seen" not in _text(c.fetch("1", "(FLAGS)")[1])
    _fetch_one(c, "1", "(BODY[])")
    assert b"\\Seen" in _text(c.fetch("1", "(FLAGS)")[1])
    c.logout()


def test_multipart_sections(harness: Harness) -> None:
    deliver(harness.alice.maildir, MULTIPART)
    c = login(harness)
    c.select("INBOX")
    _, part = _fetch_one(c, "1", "(BODY.PEEK[2])")
    assert part == b"AAAA"
    structure = _text(c.fetch("1", "(BODYSTRUCTURE)")[1]).upper()
    assert b"MIXED" in structure and b"OCTET-STREAM" in structure
    c.logout()


def test_new_messages_are_numbered_in_delivery_order(harness: Harness) -> None:
    # Names as any MTA writes them, microseconds not padded: arrival order is the
    # numeric order (the order POP3 lists them in), not the text order nor listdir's.
    box = harness.alice.maildir
    ensure_maildir(box)
    names = ["1700000000.M95000P7Q2.h", "1700000000.M130000P7Q1.h", "1700000000.M130000P7Q10.h",
             "1700000000.M130000P7Q9.h", "1699999999.M999999P7Q99.h"]
    for i, name in enumerate(names):
        (box / "new" / name).write_bytes(f"Subject: m{i}\n\nbody\n".encode())
    c = login(harness)
    assert c.select("INBOX")[0] == "OK"
    subjects = [_text(c.fetch(str(n), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1]).strip()
                for n in range(1, 6)]
    assert [s.rsplit(b"m", 1)[1][:1] for s in subjects] == [b"4", b"0", b"1", b"3", b"2"]
    c.logout()


def test_mailbox_operations_share_the_maildir(harness: Harness) -> None:
    box = harness.alice.maildir
    deliver(box, LF_MESSAGE)
    deliver(box, CRLF_MESSAGE)
    c = login(harness)
    assert c.select("INBOX")[0] == "OK"
    # delivered mail was new/; after SELECT pymap moved it to cur/ (still the same Maildir)
    assert len(list((box / "cur").iterdir())) == 2
    # SEARCH, UID SEARCH, STORE, UID FETCH
    assert c.search(None, "SUBJECT", '"crlf"') == ("OK", [b"2"])
    uids = _text(c.uid("SEARCH", "ALL")[1]).split()
    assert len(uids) == 2
    assert c.store("1", "+FLAGS", "(\\Flagged)")[0] == "OK"
    assert b"\\Flagged" in _text(c.uid("FETCH", uids[0].decode(), "(FLAGS)")[1])
    assert any(p.name.endswith(":2,F") for p in (box / "cur").iterdir())
    # CREATE makes a Maildir++ folder; COPY and APPEND keep the bytes
    assert c.create("Sent")[0] == "OK"
    assert (box / ".Sent" / "cur").is_dir()
    assert c.copy("1", "Sent")[0] == "OK"
    appended = b"From: alice@example.test\r\nSubject: appended\r\n\r\nsent body\r\n"
    typ, data = c.append("Sent", "(\\Seen)", None, appended)
    assert typ == "OK", data
    files = sorted([*(box / ".Sent" / "new").iterdir(), *(box / ".Sent" / "cur").iterdir()])
    contents = sorted(p.read_bytes() for p in files)
    assert contents == sorted([LF_MESSAGE, appended])  # copy: the file bytes, as stored
    assert any(p.name.endswith(":2,S") for p in files)
    assert c.select("Sent")[0] == "OK"
    _, body = _fetch_one(c, "1", "(BODY.PEEK[])")
    assert body == imap_backend.to_crlf(LF_MESSAGE)
    _, body = _fetch_one(c, "2", "(BODY.PEEK[])")
    assert body == appended
    # LIST / LSUB / STATUS / RENAME / DELETE
    names = _text(c.list()[1])
    assert b"INBOX" in names and b"Sent" in names
    assert c.subscribe("Sent")[0] == "OK"
    assert b"Sent" in _text(c.lsub()[1])
    assert b"MESSAGES 2" in _text(c.status("INBOX", "(MESSAGES UIDNEXT UNSEEN)")[1])
    assert c.create("Lists/Work")[0] == "OK"
    assert (box / ".Lists.Work").is_dir()
    assert c.rename("Lists/Work", "Lists/Play")[0] == "OK"
    assert (box / ".Lists.Play").is_dir() and not (box / ".Lists.Work").exists()
    assert c.delete("Lists/Play")[0] == "OK"
    assert not (box / ".Lists.Play").exists()
    # EXPUNGE and CLOSE remove files from the INBOX Maildir
    c.select("INBOX")
    c.store("2", "+FLAGS", "(\\Deleted)")
    assert c.expunge()[0] == "OK"
    assert len(list((box / "cur").iterdir())) == 1
    c.store("1", "+FLAGS", "(\\Deleted)")
    assert c.close()[0] == "OK"
    assert list((box / "cur").iterdir()) == []
    c.logout()


def test_folder_names_cannot_leave_the_maildir(harness: Harness) -> None:
    """Regression: pymap made CREATE "/" the directory "..", the parent of the Maildir,
    and DELETE "/" then removed every Maildir beside it (other users' mail)."""
    bob = harness.mail / "example.test" / "bob"
    kept = deliver(bob, CRLF_MESSAGE)
    r = Raw(harness.port)
    r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())
    parent = sorted(p.name for p in harness.alice.maildir.parent.iterdir())
    assert parent == ["alice", "bob"]
    for i, name in enumerate([b'"/"', b'".."', b'"a.b"', b'"x//y"', b'""', b'"/x"']):
        reply = r.cmd(b"c%d" % i, b"CREATE " + name)[-1]
        assert reply.startswith(b"c%d NO" % i), reply
        reply = r.cmd(b"d%d" % i, b"DELETE " + name)[-1]
        assert reply.startswith(b"d%d NO" % i), reply
    r.send(b"n CREATE {3+}\r\na\x00b\r\n")  # a NUL inside a literal name
    assert r.until_tagged(b"n")[-1].startswith(b"n NO")
    assert kept.read_bytes() == CRLF_MESSAGE
    assert sorted(p.name for p in harness.alice.maildir.parent.iterdir()) == parent
    # nested names create their superiors (RFC 3501 6.3.3) instead of crashing
    assert r.cmd(b"e", b"CREATE Archive/2024/Q1")[-1].startswith(b"e OK")
    assert (harness.alice.maildir / ".Archive.2024").is_dir()
    assert r.cmd(b"f", b"CREATE Archive/2024/Q1")[-1].startswith(b"f NO [ALREADYEXISTS]")
    assert r.cmd(b"g", b"RENAME Nope Other")[-1].startswith(b"g NO [NONEXISTENT]")
    r.close()


def test_examine_is_read_only(harness: Harness) -> None:
    deliver(harness.alice.maildir, LF_MESSAGE)
    c = login(harness)
    assert c.select("INBOX", readonly=True)[0] == "OK"
    _fetch_one(c, "1", "(BODY[])")
    assert b"\\Seen" not in _text(c.fetch("1", "(FLAGS)")[1])
    c.logout()


def test_idle_reports_new_mail(harness: Harness) -> None:
    r = Raw(harness.port)
    r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())
    r.cmd(b"b", b"SELECT INBOX")
    r.send(b"c IDLE\r\n")
    assert r.line().startswith(b"+ ")
    deliver(harness.alice.maildir, CRLF_MESSAGE)
    deadline = time.monotonic() + 10
    seen = b""
    while b"EXISTS" not in seen and time.monotonic() < deadline:
        seen += r.line()
    assert b"* 1 EXISTS" in seen
    r.send(b"DONE\r\n")
    assert r.until_tagged(b"c")[-1].startswith(b"c OK")
    r.close()


def test_idle_sees_changes_after_the_folder_settled(harness: Harness,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """IDLE polls skip unchanged folders (settled stamps); changes still show."""
    monkeypatch.setattr(imap_backend, "SIGNATURE_SETTLE_NS", 300_000_000)
    deliver(harness.alice.maildir, LF_MESSAGE)
    r = Raw(harness.port)
    r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())
    r.cmd(b"b", b"SELECT INBOX")
    r.send(b"c IDLE\r\n")
    assert r.line().startswith(b"+ ")
    settle = imap_backend.SIGNATURE_SETTLE_NS / 1e9
    time.sleep(settle + 1.5)  # now the polls find a trusted, unchanged stamp
    # another session flags the message: a rename inside cur/
    other = login(harness, "127.0.0.3")
    other.select("INBOX")
    other.store("1", "+FLAGS", "(\\Flagged)")
    other.logout()
    deadline = time.monotonic() + 10
    seen = b""
    while b"\\Flagged" not in seen and time.monotonic() < deadline:
        seen += r.line()
    assert b"* 1 FETCH (FLAGS (" in seen and b"\\Flagged" in seen
    time.sleep(settle + 1.5)
    deliver(harness.alice.maildir, CRLF_MESSAGE)
    seen = b""
    while b"EXISTS" not in seen and time.monotonic() < deadline + 10:
        seen += r.line()
    assert b"* 2 EXISTS" in seen
    r.send(b"DONE\r\n")
    assert r.until_tagged(b"c")[-1].startswith(b"c OK")
    r.close()


def test_capabilities(harness: Harness) -> None:
    r = Raw(harness.port)
    assert r.greeting.startswith(b"* OK ")
    caps = r.cmd(b"a", b"CAPABILITY")
    assert b"IMAP4rev1" in caps[0] and b"AUTH=PLAIN" in caps[0]
    assert b"LOGINDISABLED" not in caps[0]  # loopback listener
    assert b"STARTTLS" not in caps[0]  # no certificate configured
    r.cmd(b"b", f'LOGIN alice "{PASSWORD}"'.encode())
    caps = r.cmd(b"c", b"CAPABILITY")
    assert b"IDLE" in caps[0] and b"UIDPLUS" in caps[0]
    assert b"APPENDLIMIT=52428800" in caps[0]
    r.close()


# -- limits ------------------------------------------------------------------------


def test_literal_plus_before_login_is_capped(harness: Harness) -> None:
    """Regression: pymap read a 200 MB LITERAL+ literal before login (server grew ~500 MB)."""
    r = Raw(harness.port)
    r.send(b"a LOGIN {200000000+}\r\n")
    reply = r.line()
    assert reply.startswith(b"* BYE [TOOBIG]"), reply
    # the server hung up without waiting for 200 MB
    assert r.file.read() == b""
    r.close()


def test_synchronizing_literal_before_login_is_refused(harness: Harness) -> None:
    r = Raw(harness.port)
    r.send(b"a APPEND INBOX {100000}\r\n")
    reply = r.line()
    assert reply.startswith(b"a NO [TOOBIG]"), reply  # no "+ " continuation
    # the session is still in sync
    assert r.cmd(b"b", b"NOOP")[-1].startswith(b"b OK")
    # a small literal is fine before login
    r.send(b"c LOGIN {5}\r\n")
    assert r.line().startswith(b"+ ")
    r.send(b"alice {" + str(len(PASSWORD)).encode() + b"}\r\n")
    assert r.line().startswith(b"+ ")
    r.send(PASSWORD.encode() + b"\r\n")
    assert r.until_tagged(b"c")[-1].startswith(b"c OK")
    r.close()


def test_literal_cap_after_login(tmp_path: Path) -> None:
    h = Harness(tmp_path, imap={"max_literal": 1000}).start()
    try:
        r = Raw(h.port)
        r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())
        r.send(b"b APPEND INBOX {2000}\r\n")
        assert r.line().startswith(b"b NO [TOOBIG]")
        msg = b"Subject: ok\r\n\r\nfits\r\n"
        r.send(b"c APPEND INBOX {" + str(len(msg)).encode() + b"+}\r\n" + msg + b"\r\n")
        assert r.until_tagged(b"c")[-1].startswith(b"c OK")
        assert [p.read_bytes() for p in (h.alice.maildir / "cur").iterdir()] == [msg] or \
            [p.read_bytes() for p in (h.alice.maildir / "new").iterdir()] == [msg]
        r.send(b"d APPEND INBOX {5000+}\r\n")
        assert r.line().startswith(b"* BYE [TOOBIG]")
        assert r.file.read() == b""
        r.close()
    finally:
        h.stop()
    h.assert_clean()


def test_many_small_literals_are_bounded(harness: Harness) -> None:
    """Many literals in one command add up to the same cap (MULTIAPPEND, SEARCH)."""
    r = Raw(harness.port)
    chunk = b"x" * 4000
    payload = b"a ID (" + b" ".join(b"{4000+}\r\n" + chunk for _ in range(40)) + b")\r\n"
    with contextlib.suppress(ConnectionError):
        r.send(payload)  # 160 kB in 4 kB literals, each allowed on its own
    assert r.line().startswith(b"* BYE [TOOBIG]")
    r.close()


def test_huge_literal_length_digits(harness: Harness) -> None:
    r = Raw(harness.port)
    r.send(b"a LOGIN {" + b"9" * 5000 + b"}\r\n")
    reply = r.line()
    assert reply.startswith((b"a BAD", b"a NO")), reply
    r.send(b"b LOGIN {" + b"9" * 5000 + b"+}\r\n")
    assert r.line().startswith(b"* BYE [TOOBIG]")
    r.close()


def test_line_too_long(harness: Harness) -> None:
    r = Raw(harness.port)
    try:
        r.send(b"a NOOP " + b"x" * (imap_conn.MAX_LINE + 10) + b"\r\n")
    except ConnectionError:
        pass
    reply = r.line()
    assert reply.startswith(b"* BYE [TOOBIG]"), reply
    r.close()


def test_idle_timeout(tmp_path: Path) -> None:
    h = Harness(tmp_path, imap={"idle_timeout": 0.5}).start()
    try:
        r = Raw(h.port)
        r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())
        r.cmd(b"b", b"SELECT INBOX")
        r.send(b"c IDLE\r\n")
        assert r.line().startswith(b"+ ")
        t0 = time.monotonic()
        rest = r.file.read()
        assert b"* BYE Autologout" in rest
        assert time.monotonic() - t0 < 8
        r.close()
        r = Raw(h.port)  # also before login
        assert r.file.read().startswith(b"* BYE Autologout")
        r.close()
    finally:
        h.stop()
    h.assert_clean()


def test_bad_command_budget_and_auth_failures(harness: Harness) -> None:
    r = Raw(harness.port)
    for i in range(5):
        r.send(b"x%d FOOBAR\r\n" % i)
    rest = r.file.read()
    assert rest.count(b" BAD ") == 5 and rest.endswith(b"* BYE Too many errors, disconnecting.\r\n")
    r.close()
    r = Raw(harness.port)
    for i in range(imap_conn.MAX_AUTH_FAILURES):
        assert r.cmd(b"l%d" % i, b'LOGIN alice "wrong"')[-1].startswith(b"l%d NO" % i)
    r.send(b"z NOOP\r\n")
    assert r.line().startswith(b"* BYE")
    r.close()


def test_preauth_command_limit(harness: Harness) -> None:
    r = Raw(harness.port)
    for i in range(imap_conn.MAX_PREAUTH_COMMANDS):
        assert r.cmd(b"n%d" % i, b"NOOP")[-1].startswith(b"n%d OK" % i)
    r.send(b"last NOOP\r\n")
    assert r.line().startswith(b"* BYE")
    r.close()


def test_stop_says_bye(tmp_path: Path) -> None:
    h = Harness(tmp_path).start()
    r = Raw(h.port)
    r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())
    h.stop()
    assert r.file.read().startswith(b"* BYE")
    r.close()
    h.assert_clean()


# -- plaintext and TLS ---------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ssl.SSLContext]:
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    certfile, keyfile = d / "cert.pem", d / "key.pem"
    for blob in cert.cert_chain_pems:
        with certfile.open("ab") as f:
            f.write(blob.bytes())
    cert.private_key_pem.write_to_path(str(keyfile))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return certfile, keyfile, client


def test_plaintext_refused_on_public_listener_without_tls(tmp_path: Path) -> None:
    h = Harness(tmp_path, public=True).start()
    try:
        r = Raw(h.port)
        caps = r.cmd(b"a", b"CAPABILITY")[0]
        assert b"LOGINDISABLED" in caps and b"AUTH=PLAIN" not in caps
        assert r.cmd(b"b", f'LOGIN alice "{PASSWORD}"'.encode())[-1].startswith(b"b NO")
        assert r.cmd(b"c", b"AUTHENTICATE PLAIN")[-1].startswith(b"c NO")
        assert h.grant("127.0.0.2") is None
        r.close()
    finally:
        h.stop()
    h.assert_clean()


def test_allow_plaintext_setting(tmp_path: Path) -> None:
    h = Harness(tmp_path, public=True, auth=AuthSettings(allow_plaintext=True)).start()
    try:
        c = BoundIMAP("127.0.0.1", h.port, "127.0.0.2")
        assert c.login("alice", PASSWORD)[0] == "OK"
        assert h.grant("127.0.0.2") is not None
        c.logout()
    finally:
        h.stop()


def test_starttls_then_login(tmp_path: Path, certs: tuple[Path, Path, ssl.SSLContext]) -> None:
    certfile, keyfile, client = certs
    h = Harness(tmp_path, public=True, tls=(certfile, keyfile)).start()
    try:
        c = BoundIMAP("127.0.0.1", h.port, "127.0.0.2")
        assert "LOGINDISABLED" in c.capabilities and "STARTTLS" in c.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            c.login("alice", PASSWORD)
        assert c.starttls(ssl_context=client)[0] == "OK"
        assert "LOGINDISABLED" not in c.capabilities and "STARTTLS" not in c.capabilities
        assert c.login("alice", PASSWORD)[0] == "OK"
        g = h.grant("127.0.0.2")
        assert g is not None and g.user == "alice"
        c.logout()
    finally:
        h.stop()
    h.assert_clean()


def test_implicit_tls(tmp_path: Path, certs: tuple[Path, Path, ssl.SSLContext]) -> None:
    certfile, keyfile, client = certs
    h = Harness(tmp_path, public=True, tls=(certfile, keyfile)).start()
    try:
        assert h.tls_port is not None
        c = BoundIMAPSSL("127.0.0.1", h.tls_port, "127.0.0.3", client)
        assert "STARTTLS" not in c.capabilities and "LOGINDISABLED" not in c.capabilities
        deliver(h.alice.maildir, CRLF_MESSAGE)
        assert c.login("alice", PASSWORD)[0] == "OK"
        c.select("INBOX")
        _, body = _fetch_one(c, "1", "(BODY.PEEK[])")
        assert body == CRLF_MESSAGE
        assert h.grant("127.0.0.3") is not None
        c.logout()
    finally:
        h.stop()
    h.assert_clean()


def test_starttls_rejects_pipelined_plaintext(tmp_path: Path,
                                               certs: tuple[Path, Path, ssl.SSLContext]) -> None:
    certfile, keyfile, _ = certs
    h = Harness(tmp_path, public=True, tls=(certfile, keyfile)).start()
    try:
        r = Raw(h.port)
        r.send(b"a STARTTLS\r\nb LOGIN alice x\r\n")
        assert r.line().startswith(b"a OK")
        assert r.file.read() == b""  # closed instead of running "b" inside TLS
        r.close()
    finally:
        h.stop()
    h.assert_clean()


def test_importing_the_server_changes_nothing_in_pymap(tmp_path: Path) -> None:
    """pymap's defects are fixed by pymap_fixes.apply(), which the service calls when it
    is built; importing relaygate's IMAP server (in a fresh interpreter) patches nothing."""
    code = """
import sys
from pymap.backend.maildir.io import FileWriteable
import pymap.mime
from pymap.mime import MessageBody
before = (FileWriteable.file_write, MessageBody.__dict__["_find_parts"], pymap.mime.get_raw)
import relaygate.servers.imap.service as service
from relaygate.servers.imap import pymap_fixes
assert (FileWriteable.file_write, MessageBody.__dict__["_find_parts"],
        pymap.mime.get_raw) == before, "patched"
assert not pymap_fixes.applied()
from relaygate.config import Settings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.mail.directory import StaticDirectory
from relaygate.metrics import Metrics
from relaygate.stores.memory import MemoryStore
service.make_service(Context(Settings(data_dir=sys.argv[1]), RelayControl(MemoryStore()),
                             Metrics(), StaticDirectory()))
assert pymap_fixes.applied()
assert FileWriteable.file_write is not before[0]
assert MessageBody.__dict__["_find_parts"] is not before[1]
assert pymap.mime.get_raw is not before[2]
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- per-address connection limit ----------------------------------------------


def test_connections_per_address_are_limited(tmp_path: Path) -> None:
    h = Harness(tmp_path, imap={"max_connections_per_ip": 2}).start()
    try:
        def greetings(source: str, n: int) -> list[bytes]:
            socks = [socket.create_connection(("127.0.0.1", h.port), 10,
                                              source_address=(source, 0)) for _ in range(n)]
            try:
                return [s.makefile("rb").readline() for s in socks]
            finally:
                for s in socks:
                    s.close()

        lines = greetings("127.0.0.2", 3)
        assert lines[0].startswith(b"* OK") and lines[1].startswith(b"* OK"), lines
        assert lines[2] == b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
        # Another address is counted apart; closed connections are given back.
        assert all(x.startswith(b"* OK") for x in greetings("127.0.0.3", 2))
        deadline = time.monotonic() + 10
        while h.service.limiter.counts:
            assert time.monotonic() < deadline, h.service.limiter.counts
            time.sleep(0.05)
        assert all(x.startswith(b"* OK") for x in greetings("127.0.0.2", 2))
    finally:
        h.stop()
    h.assert_clean()


def test_connection_limit_counts_ipv6_per_network(harness: Harness) -> None:
    key = harness.service.limiter.key
    assert harness.service.limiter.limit == ImapSettings().max_connections_per_ip == 50
    assert key("2001:db8:1:2::1") == key("2001:db8:1:2:ffff::7") == "2001:db8:1:2::/64"
    assert key(None) == "unix"
