"""Postfix policy protocol core (bytes in, requests out, OK/DUNNO back, no sockets), and
the service's two decision paths: on the event loop (local stores) and in threads."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaygate.config import PolicySettings, Settings
from relaygate.control import RelayControl
from relaygate.decision import Decision, Verdict
from relaygate.errors import StoreError
from relaygate.grants import Grant
from relaygate.metrics import Metrics
from relaygate.protocols.policy import (
    _ASKS,
    _ASKS_MAX,
    DUNNO,
    MAX_ATTRIBUTES,
    MAX_LINE_LENGTH,
    OK,
    Answer,
    Ask,
    PolicyProtocolError,
    PolicyReader,
    PolicyRequest,
    answer_for,
    format_answer,
    format_request,
    triage,
)
from relaygate.rules import RuleSet
from relaygate.servers.base import Context
from relaygate.servers.policy import INLINE_BUSY_TIMEOUT, PolicyService, make_service
from relaygate.stores.base import GrantStore
from relaygate.stores.memory import MemoryStore
from relaygate.stores.sqlite import SqliteStore

# What Postfix 3.7 sends (SMTPD_POLICY_README, "Protocol description").
POSTFIX_REQUEST = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"protocol_name=ESMTP\n"
    b"helo_name=client.example.org\n"
    b"queue_id=\n"
    b"sender=alice@example.org\n"
    b"recipient=bob@remote.example\n"
    b"recipient_count=0\n"
    b"client_address=192.0.2.7\n"
    b"client_name=unknown\n"
    b"reverse_client_name=unknown\n"
    b"instance=1a2b.5f3e.9c1d.0\n"
    b"sasl_method=\n"
    b"sasl_username=\n"
    b"sasl_sender=\n"
    b"size=0\n"
    b"ccert_subject=\n"
    b"encryption_protocol=\n"
    b"stress=\n"
    b"server_address=192.0.2.1\n"
    b"server_port=25\n"
    b"policy_context=\n"
    b"compatibility_level=3.6\n"
    b"mail_version=3.7.11\n"
    b"\n"
)


def read_all(data: bytes, chunks: list[int] | None = None) -> list[PolicyRequest]:
    reader = PolicyReader()
    out: list[PolicyRequest] = []
    pieces = [data] if chunks is None else _split(data, chunks)
    for piece in pieces:
        reader.receive_data(piece)
        while (req := reader.next_request()) is not None:
            out.append(req)
    reader.receive_data(b"")
    while (req := reader.next_request()) is not None:
        out.append(req)
    assert reader.closed
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [p for p in out if p]


def test_postfix_request_is_parsed() -> None:
    (req,) = read_all(POSTFIX_REQUEST)
    assert req.request_type == "smtpd_access_policy"
    assert req.get("client_address") == b"192.0.2.7"
    assert req.get("queue_id") == b""
    assert req.text("helo_name") == "client.example.org"
    assert req.get("missing") is None


def test_many_requests_per_connection_and_byte_by_byte() -> None:
    stream = POSTFIX_REQUEST * 5
    assert len(read_all(stream)) == 5
    reader = PolicyReader()
    got = 0
    for i in range(len(stream)):
        reader.receive_data(stream[i : i + 1])
        while reader.next_request() is not None:
            got += 1
    assert got == 5


@pytest.mark.parametrize("bad, why", [
    (b"\n", "empty request"),
    (b"request=smtpd_access_policy\nno equals sign\n\n", "name=value"),
    (b"request=smtpd_access_policy\nClient_Address=1.2.3.4\n\n", "name=value"),
    (b"request=smtpd_access_policy\n=value\n\n", "name=value"),
    (b"request=smtpd_access_policy\nclient_address=1.2.3.4\nclient_address=5.6.7.8\n\n",
     "repeated"),
    (b"request=smtpd_access_policy\nXrequest=x\n\n", "name=value"),
    (b"request=smtpd_access_policy\n request=x\n\n", "name=value"),
    (b"client_address=1.2.3.4\n\n", "request"),
    (b"request=smtpd_access_policy\nsender=a\x00b\n\n", "NUL"),
    (b"request=smtpd_access_policy\nsender=" + b"x" * (MAX_LINE_LENGTH + 1) + b"\n\n",
     "longer"),
    (b"request=smtpd_access_policy\n" + b"a=b\n" * MAX_ATTRIBUTES + b"\n", "attributes"),
    (b"request=smtpd_access_policy\r\nclient_address=1.2.3.4\r\n\r\n", "CRLF"),
    (b"\r\n", "CRLF"),
])
def test_malformed_requests_are_protocol_errors(bad: bytes, why: str) -> None:
    reader = PolicyReader()
    reader.receive_data(bad)
    with pytest.raises(PolicyProtocolError, match=why):
        reader.next_request()


@pytest.mark.parametrize("name", ["request", "client_address", "sasl_username"])
@pytest.mark.parametrize("first", [True, False])
def test_an_attribute_a_decision_reads_may_not_repeat(name: str, first: bool) -> None:
    line = f"{name}=x\n".encode()
    rest = b"request=smtpd_access_policy\n" if name != "request" else b"sender=a\n"
    body = (line + rest + line) if first else (rest + line + b"sender=b\n" + line)
    reader = PolicyReader()
    reader.receive_data(body + b"\n")
    with pytest.raises(PolicyProtocolError, match=f"{name} repeated"):
        reader.next_request()


def test_other_attributes_are_split_out_only_when_asked_for() -> None:
    (req,) = read_all(POSTFIX_REQUEST)
    # What a decision reads was taken out while parsing ...
    assert req.read == {b"request": b"smtpd_access_policy", b"client_address": b"192.0.2.7",
                        b"sasl_username": b""}
    # ... the rest comes from the request text on demand, every line of it.
    lines = POSTFIX_REQUEST.rstrip(b"\n").split(b"\n")
    assert req.fields == dict(line.split(b"=", 1) for line in lines)
    assert len(req.fields) == len(lines) == 24
    assert req.get("mail_version") == b"3.7.11"
    # A repeated attribute nobody decides on is not a protocol error (Postfix never
    # sends one; refusing it would cost a dict of every attribute per request).
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\nsender=a\nsender=b\n\n")
    assert reader.next_request() is not None


def test_overlong_line_is_refused_before_it_ends() -> None:
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\nsender=")
    assert reader.next_request() is None
    reader.receive_data(b"x" * MAX_LINE_LENGTH)
    with pytest.raises(PolicyProtocolError, match="line longer"):
        reader.next_request()


def test_endless_attributes_are_refused_before_the_blank_line() -> None:
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\n" + b"a=b\n" * (MAX_ATTRIBUTES + 1))
    with pytest.raises(PolicyProtocolError, match="attributes"):
        reader.next_request()


def test_huge_request_is_refused() -> None:
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\n" + (b"s=" + b"x" * 4000 + b"\n") * 10)
    with pytest.raises(PolicyProtocolError, match="request longer"):
        reader.next_request()


def test_eof_in_the_middle_of_a_request() -> None:
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\nclient_address=1.2.3.4\n")
    assert reader.next_request() is None
    reader.receive_data(b"")
    with pytest.raises(PolicyProtocolError, match="middle"):
        reader.next_request()


def test_eof_between_requests_is_clean() -> None:
    reader = PolicyReader()
    reader.receive_data(POSTFIX_REQUEST)
    reader.receive_data(b"")
    assert reader.next_request() is not None
    assert reader.next_request() is None
    assert reader.closed


def req(**attrs: str) -> PolicyRequest:
    return PolicyRequest.of({k: v.encode() for k, v in attrs.items()})


def test_triage() -> None:
    assert triage(req(request="smtpd_access_policy", client_address="192.0.2.7")) == \
        Ask("192.0.2.7")
    # Postfix writes IPv6 without brackets; mapped IPv4 folds to IPv4.
    assert triage(req(request="smtpd_access_policy", client_address="2001:DB8::0:1")) == \
        Ask("2001:db8::1")
    assert triage(req(request="smtpd_access_policy", client_address="::ffff:192.0.2.7")) == \
        Ask("192.0.2.7")
    sasl = triage(req(request="smtpd_access_policy", client_address="192.0.2.7",
                      sasl_username="alice"))
    assert isinstance(sasl, Answer) and sasl.action == DUNNO and sasl.kind == "sasl"
    empty_sasl = triage(req(request="smtpd_access_policy", client_address="192.0.2.7",
                            sasl_username=""))
    assert empty_sasl == Ask("192.0.2.7")
    other = triage(req(request="junk", client_address="192.0.2.7"))
    assert isinstance(other, Answer) and other.action == DUNNO
    for bad in ("unknown", "../../etc", "1.2.3.4%eth0", ""):
        got = triage(req(request="smtpd_access_policy", client_address=bad))
        assert isinstance(got, Answer) and got.action == DUNNO, bad
    missing = triage(req(request="smtpd_access_policy"))
    assert isinstance(missing, Answer) and missing.action == DUNNO


def test_answers() -> None:
    allow = Decision(Verdict.ALLOW, "window opened by alice", "grant")
    assert answer_for(allow).action == OK
    assert answer_for(Decision(Verdict.DENY, "none", "none")).action == DUNNO
    # A store failure never allows: DUNNO lets reject_unauth_destination refuse.
    assert answer_for(Decision(Verdict.TEMPFAIL, "store down", "store")).action == DUNNO
    assert format_answer(OK) == b"action=OK\n\n"
    assert format_answer(DUNNO) == b"action=DUNNO\n\n"
    with pytest.raises(ValueError):
        format_answer("REJECT")


def test_format_request_round_trip() -> None:
    data = format_request({"request": "smtpd_access_policy", "client_address": "::1"})
    (r,) = read_all(data)
    assert r.attributes == {"request": b"smtpd_access_policy", "client_address": b"::1"}
    with pytest.raises(ValueError):
        format_request({"request": "x\ny"})


# -- properties ----------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
values = st.binary(max_size=200).filter(lambda b: b"\n" not in b and b"\0" not in b)


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(names, values, max_size=30), st.lists(st.integers(0, 10_000)))
def test_any_valid_request_survives_any_chunking(attrs: dict[str, bytes],
                                                 cuts: list[int]) -> None:
    attrs = {"request": b"smtpd_access_policy", **attrs}
    data = format_request(dict(attrs)) * 2
    got = read_all(data, cuts)
    assert [r.attributes for r in got] == [attrs, attrs]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_bytes_never_crash_the_reader(chunks: list[bytes]) -> None:
    reader = PolicyReader(max_line=64, max_attributes=8, max_request=512)
    try:
        for chunk in [*chunks, b""]:
            reader.receive_data(chunk)
            while (r := reader.next_request()) is not None:
                assert "request" in r.attributes
                for name, value in r.attributes.items():
                    assert name.isascii() and b"\n" not in value and b"\0" not in value
                assert isinstance(triage(r), (Ask, Answer))
    except PolicyProtocolError:
        pass
    assert reader.buffered <= 512 + 300


@settings(max_examples=200)
@given(st.binary(max_size=100))
def test_no_client_address_text_is_asked_about_unless_it_is_an_address(raw: bytes) -> None:
    r = PolicyRequest.of({"request": b"smtpd_access_policy", "client_address": raw})
    got = triage(r)
    if isinstance(got, Ask):
        # Only a real address reaches the store, in canonical form.
        assert got.ip.isascii() and "/" not in got.ip and " " not in got.ip


# -- the service: decisions on the event loop or in threads ----------------------

def _service(store: GrantStore, **policy: object) -> tuple[PolicyService, Context]:
    settings = Settings(policy=PolicySettings(listen=("127.0.0.1:0",), **policy))  # type: ignore[arg-type]
    ctx = Context(settings, RelayControl(store, expiry=600), Metrics())
    return make_service(ctx), ctx


def _grant(store: GrantStore, ip: str) -> None:
    now = time.time()
    store.put(Grant(ip, "alice", "example.org", "pop3", now, now + 600))


class _Spool(MemoryStore):
    """A store of a kind that is asked from the thread pool."""

    kind = "spool"


class _Failing(MemoryStore):
    def get(self, ip: str, now: float) -> Grant | None:
        raise StoreError("database is locked")


class _FailingSpool(_Failing):
    kind = "spool"


class _FailsOnTheLoop(MemoryStore):
    """Fails in the event loop's thread only: a lock that the thread path rides out."""

    def __init__(self) -> None:
        super().__init__()
        self.loop_thread = threading.get_ident()
        self.gets: list[str] = []

    def get(self, ip: str, now: float) -> Grant | None:
        on_loop = threading.get_ident() == self.loop_thread
        self.gets.append("loop" if on_loop else "thread")
        if on_loop:
            raise StoreError("database is locked")
        return super().get(ip, now)


async def _ask_all(service: PolicyService, ips: list[str]) -> list[bytes]:
    await service.start()
    try:
        port = int(service.listeners()[0].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for ip in ips:
            writer.write(format_request({"request": "smtpd_access_policy",
                                         "client_address": ip}))
            answers.append(await asyncio.wait_for(reader.readuntil(b"\n\n"), 10))
        writer.close()
        return answers
    finally:
        await service.stop(1)


OK_B, DUNNO_B = b"action=OK\n\n", b"action=DUNNO\n\n"


@pytest.mark.parametrize("store_class, inline", [(MemoryStore, True), (_Spool, False)])
async def test_both_paths_answer_ok_only_for_an_open_window(store_class: type[MemoryStore],
                                                            inline: bool) -> None:
    store = store_class()
    _grant(store, "127.0.0.3")
    service, ctx = _service(store)
    assert (service.decider is not None) is inline
    submitted: list[str] = []
    submit = service.batcher.submit

    def spy(ip: str, done: Callable[[str, Decision], None]) -> None:
        submitted.append(ip)
        submit(ip, done)

    service.batcher.submit = spy  # type: ignore[method-assign]
    assert await _ask_all(service, ["127.0.0.3", "127.0.0.4", "::ffff:127.0.0.3"]) == \
        [OK_B, DUNNO_B, OK_B]
    # The local store never goes through the thread pool; the spool store always does.
    assert submitted == ([] if inline else ["127.0.0.3", "127.0.0.4", "127.0.0.3"])
    assert ctx.metrics.decisions.labels("allow", "grant")._value.get() == 2


@pytest.mark.parametrize("store_class", [_Failing, _FailingSpool])
async def test_both_paths_fail_closed(store_class: type[MemoryStore],
                                      caplog: pytest.LogCaptureFixture) -> None:
    store = store_class()
    _grant(store, "127.0.0.3")
    service, ctx = _service(store)
    with caplog.at_level(logging.WARNING):
        assert await _ask_all(service, ["127.0.0.3"]) == [DUNNO_B]
    if service.decider is not None:
        assert service.decider.handed_off == 1  # the loop did not answer: the thread did
    # One failure, one warning (the inline attempt is not logged twice).
    warnings = [r for r in caplog.records if r.name == "relaygate.control"]
    assert len(warnings) == 1
    assert ctx.metrics.decisions.labels("tempfail", "store")._value.get() == 1


async def test_a_lookup_that_fails_on_the_loop_is_retried_in_a_thread() -> None:
    store = _FailsOnTheLoop()
    _grant(store, "127.0.0.3")
    service, _ = _service(store)
    assert await _ask_all(service, ["127.0.0.3", "127.0.0.4"]) == [OK_B, DUNNO_B]
    assert store.gets == ["loop", "thread", "loop", "thread"]
    assert service.decider is not None and service.decider.handed_off == 2


async def test_rules_reloaded_into_the_control_apply_on_the_loop() -> None:
    service, ctx = _service(MemoryStore())
    await service.start()
    try:
        port = int(service.listeners()[0].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        req = format_request({"request": "smtpd_access_policy", "client_address": "10.1.2.3"})
        writer.write(req)
        assert await reader.readuntil(b"\n\n") == DUNNO_B
        # what serve does on SIGHUP
        ctx.control.rules = RuleSet.parse('10.1.:allow,RELAYCLIENT=""\n')
        writer.write(req)
        assert await reader.readuntil(b"\n\n") == OK_B
        writer.close()
    finally:
        await service.stop(1)


async def test_sqlite_on_the_loop_sees_every_revoke_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "grants.db"
    store = SqliteStore(path, busy_timeout=0.2)
    service, _ = _service(store)
    assert service.decider is not None
    other = SqliteStore(path)  # another process: the CLI, the Dovecot hook
    try:
        await service.start()
        port = int(service.listeners()[0].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def ask(ip: str) -> bytes:
            writer.write(format_request({"request": "smtpd_access_policy",
                                         "client_address": ip}))
            return await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)

        # No database yet: the loop does not create one; the thread path's store does.
        assert await ask("127.0.0.3") == DUNNO_B
        assert service.decider.handed_off == 1
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        _grant(other, "127.0.0.3")
        assert await ask("127.0.0.3") == OK_B
        other.delete("127.0.0.3")
        assert await ask("127.0.0.3") == DUNNO_B  # no answer is remembered
        _grant(other, "127.0.0.3")
        assert await ask("127.0.0.3") == OK_B
        assert service.decider.handed_off == 1  # all of these on the loop
        writer.close()
    finally:
        await service.stop(1)
        other.close()
        store.close()


async def test_sqlite_lock_on_the_loop_is_bounded_and_fails_closed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relaygate.control")
    path = tmp_path / "grants.db"
    setup = SqliteStore(path)
    _grant(setup, "127.0.0.3")
    setup.close()
    # Another process holds the database in exclusive locking mode: no reader gets in.
    locker: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
    assert locker is not None
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("DELETE FROM grants WHERE ip = 'nobody'")
    store = SqliteStore(path, busy_timeout=0.3)
    service, _ = _service(store)
    assert service.decider is not None
    gaps: list[float] = []

    async def ticker() -> None:  # how long the loop goes without running a task
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    await service.start()
    try:
        port = int(service.listeners()[0].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        req = format_request({"request": "smtpd_access_policy", "client_address": "127.0.0.3"})
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        writer.write(req)
        # Locked beyond the store's busy timeout: DUNNO (fail closed) ...
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 10) == DUNNO_B
        tick.cancel()
        assert service.decider.handed_off == 1
        # ... and the loop never stalled much longer than the inline busy timeout (slack
        # for a busy machine), although the thread path waited 0.3 s for the lock.
        assert max(gaps) < INLINE_BUSY_TIMEOUT + 0.15
        locker.execute("ROLLBACK")
        locker.close()
        locker = None
        writer.write(req)
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 10) == OK_B
        assert service.decider.handed_off == 1  # back on the loop
        # The thread path warned about the failure, the loop reported the recovery.
        warned = [r.getMessage() for r in caplog.records if r.name == "relaygate.control"]
        assert len(warned) == 2, warned
        assert warned[0].startswith("grant store unreachable, refusing to relay for 127.0.0.3")
        assert warned[1].startswith("grant store reachable again")
        writer.close()
    finally:
        if locker is not None:
            locker.close()
        await service.stop(1)
        store.close()


def test_address_parse_memo_is_bounded() -> None:
    for i in range(_ASKS_MAX + 10):
        triage(req(request="smtpd_access_policy", client_address=f"10.{i >> 8 & 255}.{i & 255}.1"))
    assert 0 < len(_ASKS) <= _ASKS_MAX
    assert triage(req(request="smtpd_access_policy", client_address="10.0.0.1")) == \
        Ask("10.0.0.1")


async def test_a_client_that_never_reads_its_answers_is_not_read_either() -> None:
    service, _ = _service(MemoryStore())
    await service.start()
    try:
        port = int(service.listeners()[0].rpartition(":")[2])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small before connect
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        while not service.connections:
            await asyncio.sleep(0.01)
        (conn,) = service.connections
        assert conn.transport is not None
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET,
                                                           socket.SO_SNDBUF, 4096)
        req = format_request({"request": "smtpd_access_policy", "client_address": "127.0.0.4"})
        count = (1 << 20) // len(req)
        writer.write(req * count)  # and never read
        for _ in range(500):
            if not conn.transport.is_reading():
                break
            await asyncio.sleep(0.01)
        assert not conn.transport.is_reading()
        # What the server holds stays bounded: a few hundred KiB, not the 260 KiB of
        # answers per MiB of requests times however much the client sends.
        assert conn.transport.get_write_buffer_size() < 512 * 1024
        # Reading the answers lets the rest through, in order, every one answered.
        got = await asyncio.wait_for(reader.readexactly(len(DUNNO_B) * count), 30)
        assert got == DUNNO_B * count
        writer.close()
    finally:
        await service.stop(1)
