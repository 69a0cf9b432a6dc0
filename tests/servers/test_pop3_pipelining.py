"""The POP3 connection loop: pipelined commands, back-pressure, read-ahead, the idle timer.

The server answers commands that need no waiting right where their bytes
arrive, reads the messages after a RETR ahead in the same thread hop, and
keeps one lazy idle timer per connection (relaygate.servers.pop3._Channel):
these tests hold it to the same wire behaviour as one command at a time.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pop3_harness import Pop3Harness, start_pop3

from relaygate.mail.maildir import deliver
from relaygate.protocols.pop3 import encode_message
from relaygate.servers import pop3 as pop3_module
from relaygate.servers.pop3 import Pop3Service


@pytest.fixture
async def pop(tmp_path: Path) -> AsyncIterator[Pop3Harness]:
    h = await start_pop3(tmp_path)
    h.db.add("alice", "alice-pw")
    yield h
    await h.stop()


def body(i: int, size: int) -> bytes:
    head = b"Subject: message %d\r\n\r\n" % i if i % 2 else b"Subject: message %d\n\n" % i
    line = b".dotted line %d\n" % i if i % 3 == 0 else b"plain line of message %d\n" % i
    return head + line * (size // len(line)) + b"no final line end"


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), 10, source_address=("127.0.0.2", 0))
    assert s.recv(1000).startswith(b"+OK")
    return s


def read_all(s: socket.socket) -> bytes:
    data = bytearray()
    while chunk := s.recv(1 << 20):
        data += chunk
    return bytes(data)


async def test_pipelined_retr_and_dele_under_back_pressure(pop: Pop3Harness) -> None:
    """Every command sent at once, the replies read only later: the server stops
    writing while the client does not read, and everything arrives in order."""
    box = pop.db.find_account("alice").maildir  # type: ignore[union-attr]
    # small ones (read ahead), and ones larger than the read-ahead and than a socket buffer
    sizes = [300, 5000, 200_000, 40, 70_000, 1_500_000, 900, 12_000] * 3
    bodies = [body(i, n) for i, n in enumerate(sizes)]
    for b in bodies:
        deliver(box, b)

    def session() -> bytes:
        s = connect(pop.port())
        commands = b"".join(b"RETR %d\r\nDELE %d\r\n" % (i, i)
                            for i in range(1, len(bodies) + 1))
        s.sendall(b"USER alice\r\nPASS alice-pw\r\n" + commands + b"QUIT\r\n")
        time.sleep(0.5)  # the server fills the socket buffers and waits for us
        with s:
            return read_all(s)

    wire = await asyncio.to_thread(session)
    expected = [b"+OK Send your password\r\n"]
    expected.append(b"+OK maildrop has %d messages (%d octets)\r\n" % (
        len(bodies), sum(len(encode_message(b)) for b in bodies)
        - sum(encode_message(b).count(b"\r\n..") for b in bodies) - 3 * len(bodies)))
    for i, b in enumerate(bodies, 1):
        size = len(encode_message(b)) - encode_message(b).count(b"\r\n..") - 3
        expected.append(b"+OK %d octets\r\n" % size + encode_message(b))
        expected.append(b"+OK Message %d deleted\r\n" % i)
    expected.append(b"+OK relaygate POP3 server signing off\r\n")
    assert wire == b"".join(expected)
    assert not list((box / "new").iterdir()) and not list((box / "cur").iterdir())


async def test_commands_split_across_packets_and_ended_by_eof(pop: Pop3Harness) -> None:
    box = pop.db.find_account("alice").maildir  # type: ignore[union-attr]
    msg = body(3, 2000)
    p = deliver(box, msg)

    def session() -> bytes:
        s = connect(pop.port())
        with s:
            for piece in (b"US", b"ER al", b"ice\r", b"\nPASS alice-pw\r\nRE", b"TR 1",
                          b"\r\nDE", b"LE 1\r\nQU"):
                s.sendall(piece)
                time.sleep(0.05)
            s.sendall(b"IT\r\n")
            s.shutdown(socket.SHUT_WR)  # the QUIT still gets its answer and its UPDATE
            return read_all(s)

    wire = await asyncio.to_thread(session)
    assert wire.endswith(encode_message(msg) + b"+OK Message 1 deleted\r\n"
                         b"+OK relaygate POP3 server signing off\r\n")
    assert not p.exists()


async def test_retr_reads_ahead_within_its_budget(
        pop: Pop3Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    box = pop.db.find_account("alice").maildir  # type: ignore[union-attr]
    bodies = [b"Subject: %d\n\n" % i + b"x" * 200 + b"\n" for i in range(5)]
    for b in bodies:
        deliver(box, b)
    wire_size = len(encode_message(bodies[0])) - 3
    # room for two messages read ahead, not three
    monkeypatch.setattr(pop3_module, "READ_AHEAD", 2 * (wire_size + wire_size // 64 + 3) + 1)
    reads: list[int] = []
    real = Pop3Service._hop

    def counting(self: Pop3Service, func: Any, /, *args: Any) -> Any:
        if func is pop3_module._read_message:
            reads.append(1 + len(args[3]))
        return real(self, func, *args)

    monkeypatch.setattr(Pop3Service, "_hop", counting)

    def session() -> bytes:
        s = connect(pop.port())
        with s:
            s.sendall(b"USER alice\r\nPASS alice-pw\r\n"
                      + b"".join(b"RETR %d\r\n" % i for i in range(1, 6)) + b"QUIT\r\n")
            return read_all(s)

    wire = await asyncio.to_thread(session)
    assert all(encode_message(b) in wire for b in bodies)
    assert reads == [3, 2]  # RETR 1 reads 2 and 3 with it, RETR 4 reads 5
    assert len(list((box / "cur").iterdir())) == 5


async def test_a_message_read_ahead_is_sent_even_if_removed_meanwhile(
        pop: Pop3Harness) -> None:
    """Read ahead, a message is the session's already; one not read yet that another
    reader removed is answered as before."""
    box = pop.db.find_account("alice").maildir  # type: ignore[union-attr]
    small = b"Subject: small\n\nhello\n"
    p1, p2 = deliver(box, small), deliver(box, small.replace(b"hello", b"again"))
    p3 = deliver(box, b"Subject: big\n\n" + b"y" * (pop3_module.READ_AHEAD + 10) + b"\n")

    def session() -> list[bytes]:
        s = connect(pop.port())
        f = s.makefile("rb")
        with s, f:
            s.sendall(b"USER alice\r\nPASS alice-pw\r\n")
            f.readline()
            f.readline()
            s.sendall(b"RETR 1\r\n")
            while f.readline() not in (b".\r\n", b""):
                pass
            p2.unlink()
            p3.unlink()
            s.sendall(b"RETR 2\r\n")
            out = [f.readline(), f.readline(), f.readline(), f.readline(), f.readline()]
            s.sendall(b"RETR 3\r\nQUIT\r\n")
            return [*out, f.readline(), f.readline()]

    out = await asyncio.to_thread(session)
    assert out[1:5] == [b"Subject: small\r\n", b"\r\n", b"again\r\n", b".\r\n"]
    assert out[5] == b"-ERR [SYS/TEMP] Message cannot be read now\r\n"
    assert out[6].startswith(b"+OK")
    assert not p1.exists()


async def test_each_command_restarts_the_idle_timer(tmp_path: Path) -> None:
    h = await start_pop3(tmp_path, pop3={"idle_timeout": 0.6})
    try:
        def session() -> tuple[list[bytes], bytes, float]:
            s = connect(h.port())
            f = s.makefile("rb")
            with s, f:
                replies = []
                for _ in range(8):  # 1.6 s of commands, never 0.6 s apart
                    time.sleep(0.2)
                    s.sendall(b"CAPA\r\n")
                    replies.append(f.readline())
                    while f.readline() not in (b".\r\n", b""):
                        pass
                t0 = time.monotonic()
                return replies, f.readline(), time.monotonic() - t0

        replies, last, waited = await asyncio.to_thread(session)
        assert replies == [b"+OK Capability list follows\r\n"] * 8
        assert last == b"-ERR Autologout: idle timeout\r\n"
        assert 0.4 < waited < 5
    finally:
        await h.stop()


async def test_a_client_that_stops_reading_is_cut_after_the_idle_timeout(
        tmp_path: Path) -> None:
    h = await start_pop3(tmp_path, pop3={"idle_timeout": 0.5})
    h.db.add("alice", "alice-pw")
    box = h.db.find_account("alice").maildir  # type: ignore[union-attr]
    for i in range(4):
        deliver(box, body(i, 2_000_000))
    try:
        s = await asyncio.to_thread(connect, h.port())
        with s:
            s.sendall(b"USER alice\r\nPASS alice-pw\r\n"
                      + b"".join(b"RETR %d\r\n" % i for i in range(1, 5)))
            for _ in range(50):
                await asyncio.sleep(0.1)
                if not h.service._sessions:
                    break
            assert not h.service._sessions  # gone, though it never read a byte
            assert h.service.limiter.counts == {}
    finally:
        await h.stop()


async def test_pipelined_listings_wait_for_a_client_that_does_not_read(
        pop: Pop3Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A UIDL is a few octets and its answer may be large: a client that pipelines
    many and reads none must not make the server queue all their answers (it stops
    between commands once a batch of replies is queued and the transport is full)."""
    box = pop.db.find_account("alice").maildir  # type: ignore[union-attr]
    for i in range(200):
        deliver(box, b"Subject: %d\n\nx\n" % i)
    queued: list[int] = []
    real_write = pop3_module._Channel.write

    def write(self: Any, data: bytes) -> None:
        real_write(self, data)
        assert self.transport is not None
        queued.append(self.transport.get_write_buffer_size())

    monkeypatch.setattr(pop3_module._Channel, "write", write)
    s = await asyncio.to_thread(connect, pop.port())
    with s:
        s.setblocking(False)
        payload = b"USER alice\r\nPASS alice-pw\r\n" + b"UIDL\r\nLIST\r\n" * 20_000
        sent = 0
        for _ in range(100):  # until the server stops reading (or 1 s)
            try:
                sent += s.send(payload[sent:sent + 65536])
            except BlockingIOError:
                pass
            await asyncio.sleep(0.01)
        assert sent > 2 * pop3_module.PENDING_LIMIT
    # the transport's high-water mark, a batch of replies and one more listing
    assert max(queued) < 512 * 1024


@pytest.mark.parametrize("sizes", [[2_000_000] * 4, [10_000] * 4], ids=["writing", "idle"])
async def test_a_client_that_never_reads_does_not_keep_its_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: list[int]) -> None:
    """The session of a client that stops reading ends after the idle timeout (while
    the server waits to write, or idle with replies still unsent) and frees its
    per-address slot; its socket must not stay open holding the unsent replies (a
    close waits for them for ever), or the client could open any number of them."""
    h = await start_pop3(tmp_path, pop3={"idle_timeout": 0.5, "max_connections_per_ip": 1})
    h.db.add("alice", "alice-pw")
    box = h.db.find_account("alice").maildir  # type: ignore[union-attr]
    for i, size in enumerate(sizes):
        deliver(box, body(i, size))
    channels: list[Any] = []
    real_init = pop3_module._Channel.__init__

    def init(self: Any, *args: Any) -> None:
        real_init(self, *args)
        channels.append(self)

    real_made = pop3_module._Channel.connection_made

    def made(self: Any, transport: Any) -> None:
        # small socket buffers: what the client leaves unread stays in the transport
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        real_made(self, transport)

    monkeypatch.setattr(pop3_module._Channel, "__init__", init)
    monkeypatch.setattr(pop3_module._Channel, "connection_made", made)
    try:
        s = socket.socket()
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.bind(("127.0.0.2", 0))
            s.settimeout(10)
            await asyncio.to_thread(s.connect, ("127.0.0.1", h.port()))
            s.sendall(b"USER alice\r\nPASS alice-pw\r\n"
                      + b"".join(b"RETR %d\r\n" % i for i in range(1, 5)))
            for _ in range(100):
                await asyncio.sleep(0.1)
                if not h.service._sessions and channels[0]._lost:
                    break
            assert not h.service._sessions and h.service.limiter.counts == {}
            assert channels[0]._lost  # the server let go of the socket
    finally:
        await h.stop()
