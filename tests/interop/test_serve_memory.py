"""Memory of a running ``relaygate serve`` under large messages (issue 13, item 3).

Several clients send large messages at once; the serve process's peak RSS
(VmHWM, reset to the current RSS before the transfers through
``/proc/PID/clear_refs``) may grow by a bounded buffer per transfer, not by the
messages. Holding the messages in memory, as aiosmtpd's own DATA does, grows
it by several times their total size. No timing is asserted.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_harness import Serve

CLIENTS = 6
MESSAGE_MB = 12
#: generous: streaming needs a few MB; holding the messages needs 3-4 x 72 MB
GROWTH_LIMIT_MB = 64.0
LINE = b"x" * 70 + b"\r\n"


def status_kb(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise LookupError(name)


def settled_rss(pid: int) -> int:
    last = status_kb(pid, "VmRSS")
    for _ in range(20):
        time.sleep(0.5)
        now = status_kb(pid, "VmRSS")
        if abs(now - last) < 1024:
            return now
        last = now
    return last


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.buf = b""
        assert self.reply().startswith(b"220")

    def reply(self) -> bytes:
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(self.buf)
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            if line[3:4] != b"-":
                return line

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def send_large(port: int, rcpt: str, size: int, out: list[bytes]) -> None:
    c = Client(port)
    try:
        for line in (b"EHLO big.example", b"MAIL FROM:<big@example.com>",
                     f"RCPT TO:<{rcpt}>".encode()):
            assert c.cmd(line).startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        c.sock.sendall(b"Subject: large\r\n\r\n")
        block = LINE * 1000
        for _ in range(size // len(block)):
            c.sock.sendall(block)
        out.append(c.cmd(b"."))
        c.cmd(b"QUIT")
    finally:
        c.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path / "serve", services=("smtp",))
    for i in range(CLIENTS):
        s.add_user(f"user{i}", "memory test password")
    s.start()
    yield s
    assert s.stop() == 0, s.log()


def test_concurrent_large_messages_do_not_grow_memory_with_their_size(serve: Serve) -> None:
    assert serve.proc is not None
    pid = serve.proc.pid
    port = serve.ports["smtp"]
    warm: list[bytes] = []
    send_large(port, "user0@example.org", 200_000, warm)  # imports, threads
    assert warm[0].startswith(b"250")
    base = settled_rss(pid)
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass  # older kernels: VmHWM is then the peak since start, at least the baseline
    replies: list[bytes] = []
    size = MESSAGE_MB * 1024 * 1024
    threads = [threading.Thread(target=send_large,
                                args=(port, f"user{i}@example.org", size, replies))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    peak = status_kb(pid, "VmHWM")
    assert len(replies) == CLIENTS and all(r.startswith(b"250") for r in replies), replies
    growth_mb = (peak - base) / 1024
    assert growth_mb < GROWTH_LIMIT_MB, \
        f"peak RSS grew by {growth_mb:.0f} MB for {CLIENTS} x {MESSAGE_MB} MB messages"
    maildirs = serve.data_dir / "mail" / "example.org"
    for i in range(CLIENTS):
        tmp = maildirs / f"user{i}" / "tmp"
        assert not tmp.is_dir() or os.listdir(tmp) == []
        sizes = [p.stat().st_size for p in (maildirs / f"user{i}" / "new").iterdir()]
        assert max(sizes) > size - len(LINE) * 1000  # the whole message, headers added
