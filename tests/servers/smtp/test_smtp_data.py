"""DATA written to disk as it arrives: what is left behind, the refusals, the memory budget."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_smtp_support import LOCAL, RULE_IP, RawClient, SmtpHarness

from relaygate.mail.queue import Queue
from relaygate.servers.smtp.data import MESSAGE_BUFFER, WRITE_AT, DataBudget, IncomingMessage

BODY = b"".join(b"line %06d " % i + b"z" * 60 + b"\r\n" for i in range(20_000))  # ~1.4 MB


@pytest.fixture
def h(tmp_path: Path) -> Iterator[SmtpHarness]:
    harness = SmtpHarness(tmp_path)
    yield harness
    harness.stop()


def start_data(h: SmtpHarness, *rcpts: str) -> RawClient:
    r = RawClient("127.0.0.1", h.port(), RULE_IP)
    assert r.cmd("EHLO client.example").startswith("250")
    assert r.cmd("MAIL FROM:<a@sender.example>").startswith("250")
    for rcpt in rcpts:
        assert r.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    assert r.cmd("DATA").startswith("354")
    return r


def leftovers(h: SmtpHarness) -> list[Path]:
    """Every file of a message that is not (or not yet) delivered or queued."""
    out: list[Path] = []
    for login in ("alice", "bob"):
        for sub in ("tmp", "new"):
            d = h.tmp / "mail" / login / sub
            if d.is_dir():
                out += list(d.iterdir())
    assert h.queue is not None
    return out + h.queue.partial_files() + sorted(h.queue.directory.glob("*.msg"))


def test_large_message_reaches_queue_and_mailboxes_intact(h: SmtpHarness) -> None:
    r = start_data(h, f"alice@{LOCAL}", f"bob@{LOCAL}", "x@remote.invalid")
    r.send(b"Subject: big\r\n\r\n" + BODY + b"..stuffed\r\n")
    assert r.cmd(b".").startswith("250 2.0.0")
    r.close()
    assert h.queue is not None
    (queued,) = h.queue.items
    assert queued[2].startswith(b"Received: from client.example ([127.0.0.4])")
    assert queued[2].endswith(b"\r\n\r\n" + BODY + b".stuffed\r\n")
    for login in ("alice", "bob"):
        (msg,) = h.maildir_messages(login)
        assert msg == b"Return-Path: <a@sender.example>\r\n" + queued[2]
        (path,) = (h.tmp / "mail" / login / "new").iterdir()
        assert path.name.endswith(f",S={len(msg)}")
        assert list((h.tmp / "mail" / login / "tmp").iterdir()) == []


def test_client_gone_mid_data_leaves_nothing(h: SmtpHarness) -> None:
    r = start_data(h, f"alice@{LOCAL}", "x@remote.invalid")
    r.send(b"Subject: cut\r\n\r\n" + BODY)
    # the files exist while the data arrives
    assert h.wait_for(lambda: any(p.parent.name == "tmp" for p in leftovers(h)))
    r.close()
    assert h.wait_for(lambda: leftovers(h) == []), leftovers(h)
    assert h.queue is not None and h.queue.items == []


def test_client_reset_mid_data_leaves_nothing(h: SmtpHarness) -> None:
    import socket
    import struct

    r = start_data(h, f"bob@{LOCAL}")
    r.send(b"Subject: reset\r\n\r\n" + BODY[:300_000])
    r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    r.close()  # RST
    assert h.wait_for(lambda: leftovers(h) == []), leftovers(h)


def test_too_big_is_552_after_the_whole_message(tmp_path: Path) -> None:
    h = SmtpHarness(tmp_path, smtp={"max_message_size": 500_000})
    try:
        r = start_data(h, f"alice@{LOCAL}", "x@remote.invalid")
        r.send(b"Subject: big\r\n\r\n" + BODY)
        # the reply comes only after the end of data, and the session goes on
        assert r.cmd(b".") == "552 5.3.4 Message too big for system"
        assert r.cmd("NOOP").startswith("250")
        r.close()
        assert leftovers(h) == []
    finally:
        h.stop()


def test_commands_pipelined_after_the_end_of_data_are_answered(h: SmtpHarness) -> None:
    r = start_data(h, f"alice@{LOCAL}")
    r.send(b"Subject: one\r\n\r\nbody\r\n.\r\nMAIL FROM:<b@sender.example>\r\n"
           b"RCPT TO:<bob@" + LOCAL.encode() + b">\r\nDATA\r\nSubject: two\r\n\r\n.\r\nQUIT\r\n")
    assert r.reply().startswith("250 2.0.0")
    assert r.reply().startswith("250")
    assert r.reply().startswith("250")
    assert r.reply().startswith("354")
    assert r.reply().startswith("250 2.0.0")
    assert r.reply().startswith("221")
    r.close()
    assert h.maildir_messages("alice")[0].endswith(b"Subject: one\r\n\r\nbody\r\n")
    assert h.maildir_messages("bob")[0].endswith(b"Subject: two\r\n\r\n")


def test_real_queue_takes_a_message_in_pieces(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    w = q.open_message("a@example.org", ["b@example.net"])
    for i in range(0, len(BODY), 70_001):
        w.write(BODY[i:i + 70_001])
    qid = w.commit()
    assert q.read_message(qid) == BODY
    assert q.load(qid).size == len(BODY)
    assert list(q.tmp_dir.iterdir()) == []
    w2 = q.open_message("a@example.org", ["b@example.net"])
    w2.write(b"partial")
    w2.discard()
    w2.discard()
    assert list(q.tmp_dir.iterdir()) == [] and q.ids() == [qid]


# -- the memory budget ------------------------------------------------------------------


class SlowFile:
    """A message file whose writes wait for ``gate`` (a disk slower than the network)."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.data = bytearray()
        self.writes = 0
        self.discarded = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.gate.wait(10)
        self.data += data
        self.writes += 1

    def commit(self) -> bytes:
        return bytes(self.data)

    def discard(self) -> None:
        self.discarded = True


async def test_budget_makes_transfers_wait_and_loses_nothing() -> None:
    gate = threading.Event()
    budget = DataBudget(MESSAGE_BUFFER)
    pieces = [bytes([65 + i % 26]) * 60_000 for i in range(60)]  # 3.6 MB per message
    with ThreadPoolExecutor(4) as pool:
        files = [SlowFile(gate), SlowFile(gate)]
        msgs = [IncomingMessage([f], executor=pool, budget=budget) for f in files]

        async def feed(m: IncomingMessage) -> None:
            for p in pieces:
                await m.add(p)
                assert budget.used <= budget.limit
            await m.flush()

        tasks = [asyncio.create_task(feed(m)) for m in msgs]
        await asyncio.sleep(0.2)
        # the disk is stuck: both transfers wait, holding no more than the budget
        assert not any(t.done() for t in tasks)
        assert budget.used <= budget.limit and any(m.waiting for m in msgs)
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert budget.used == 0
    for f in files:
        assert bytes(f.data) == b"".join(pieces)
        assert f.writes < len(pieces)  # what arrived during a write went in one write


async def test_discard_while_a_write_is_in_flight_removes_files_after_it() -> None:
    gate = threading.Event()
    budget = DataBudget(MESSAGE_BUFFER)
    with ThreadPoolExecutor(1) as pool:
        f = SlowFile(gate)
        m = IncomingMessage([f], executor=pool, budget=budget)
        await m.add(b"x" * WRITE_AT)  # enough to start a write during the transfer
        m.discard()
        assert not f.discarded  # the write still runs: the file must stay open for it
        gate.set()
        for _ in range(100):
            if f.discarded:
                break
            await asyncio.sleep(0.02)
        assert f.discarded and budget.used == 0
        await m.add(b"more")  # ignored after a discard
        assert budget.used == 0


async def test_failed_write_is_reported_by_flush() -> None:
    class Full(SlowFile):
        def write(self, data: bytes | bytearray | memoryview) -> None:
            raise OSError(28, "No space left on device")

    budget = DataBudget(MESSAGE_BUFFER)
    with ThreadPoolExecutor(1) as pool:
        f = Full(threading.Event())
        m = IncomingMessage([f], executor=pool, budget=budget)
        await m.add(b"x" * 1000)
        with pytest.raises(OSError, match="No space"):
            await m.flush()
        assert f.discarded and budget.used == 0


async def test_budget_serves_waiters_in_order_and_forgets_cancelled_ones() -> None:
    budget = DataBudget(MESSAGE_BUFFER)
    await budget.take(MESSAGE_BUFFER)
    order: list[str] = []

    async def want(name: str, n: int) -> None:
        await budget.take(n)
        order.append(name)

    a = asyncio.create_task(want("a", 600_000))
    b = asyncio.create_task(want("b", 100))
    c = asyncio.create_task(want("c", 300_000))
    await asyncio.sleep(0)
    assert budget.waiting == 3
    b.cancel()
    await asyncio.sleep(0)
    budget.give(MESSAGE_BUFFER)
    await asyncio.gather(a, c)
    assert order == ["a", "c"] and budget.used == 900_000 and budget.waiting == 0


async def test_a_waiter_cancelled_as_room_is_given_goes_quietly() -> None:
    """Cancelled (client gone) in the same turn as room is given: CancelledError, no other."""
    budget = DataBudget(MESSAGE_BUFFER)
    await budget.take(MESSAGE_BUFFER)
    a = asyncio.create_task(budget.take(100))
    b = asyncio.create_task(budget.take(200))
    await asyncio.sleep(0)
    a.cancel()
    budget.give(MESSAGE_BUFFER)  # drops the cancelled waiter, grants b
    with pytest.raises(asyncio.CancelledError):
        await a
    await b
    assert budget.used == 200 and budget.waiting == 0


def test_transfers_holding_small_unwritten_pieces_do_not_stall_each_other(
        tmp_path: Path) -> None:
    """The whole budget held by pieces below WRITE_AT (not yet written) must still drain.

    Each of more transfers than the budget holds WRITE_AT-sized pieces of has just
    under WRITE_AT bytes waiting, then sends more: a transfer that waits for room
    must hand its own waiting bytes to the disk, or nothing is ever written, nobody
    gets room, and (waiting for the disk is not the client's idleness) no timeout
    ends it.
    """
    h = SmtpHarness(tmp_path, smtp={"data_memory_limit": MESSAGE_BUFFER,
                                    "max_connections_per_ip": 100})
    piece = (b"x" * 98 + b"\r\n") * ((WRITE_AT - 2000) // 100)
    clients = MESSAGE_BUFFER // len(piece) + 2
    try:
        rs = []
        for _ in range(clients):
            r = RawClient("127.0.0.1", h.port(), timeout=30)
            assert r.cmd("EHLO client.example").startswith("250")
            assert r.cmd("MAIL FROM:<a@sender.example>").startswith("250")
            assert r.cmd(f"RCPT TO:<bob@{LOCAL}>").startswith("250")
            assert r.cmd("DATA").startswith("354")
            rs.append(r)
        for r in rs:
            r.send(b"Subject: piece\r\n\r\n" + piece)
        for r in rs:
            r.send(piece + b".\r\n")
        for r in rs:
            assert r.reply().startswith("250 2.0.0")
            r.close()
        assert len(h.maildir_messages("bob")) == clients
    finally:
        h.stop()
