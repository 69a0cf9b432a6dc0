"""relay-ctrl-send -> relay-ctrl-udp over loopback UDP: signed packets, refusals, replays."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygate.integrations.qmail.env import Messages
from relaygate.integrations.qmail.udp import Receiver
from relaygate.protocols import relayctrl_packet as rp
from relaygate.stores.memory import MemoryStore

from .helpers import PATH, program, run

SECRET = "correct horse battery staple"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UdpReceiver:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def exchange(self, packet: bytes, wait: float = 1.0) -> bytes | None:
        """Send one datagram from 127.0.0.1; the answer, or None when there is none."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(wait)
            s.sendto(packet, ("127.0.0.1", self.port))
            try:
                return s.recv(1024)
            except TimeoutError:
                return None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start_receiver(tmp_path: Path, spool: Path, secret: str | None) -> UdpReceiver:
    port = free_udp_port()
    env = {"PATH": PATH, "RELAY_CTRL_DIR": str(spool), "RELAY_CTRL_BIND": "127.0.0.1",
           "RELAY_CTRL_PORT": str(port), "RELAY_CTRL_LOG_IPS": "1"}
    if secret is not None:
        env["RELAY_CTRL_SECRET"] = secret
    log = tmp_path / f"udp-{port}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([program("relay-ctrl-udp")], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 30
    while "listening on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"relay-ctrl-udp did not start: {log.read_text()}")
        time.sleep(0.05)
    return UdpReceiver(proc, port, log)


@pytest.fixture
def receivers() -> Iterator[list[UdpReceiver]]:
    started: list[UdpReceiver] = []
    yield started
    for r in started:
        r.proc.terminate()
        r.proc.wait(10)


def wait_for(path: Path, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def send(ip: str, port: int, secret: str | None,
         **extra: str) -> subprocess.CompletedProcess[bytes]:
    env = {"TCPREMOTEIP": ip, "USER": "alice", "DOMAIN": "example.org",
           "RELAY_CTRL_REMOTES": "127.0.0.1", "RELAY_CTRL_PORT": str(port),
           "RELAY_CTRL_TRIES": "2", "RELAY_CTRL_TIMEOUT": "1", **extra}
    if secret is not None:
        env["RELAY_CTRL_SECRET"] = secret
    return run([program("relay-ctrl-send"), "echo", "pop3d"], env)


def test_signed_send_opens_the_window_on_the_receiver(
    tmp_path: Path, spool: Path, receivers: list[UdpReceiver],
) -> None:
    receiver = start_receiver(tmp_path, spool, SECRET)
    receivers.append(receiver)
    result = send("127.0.0.2", receiver.port, SECRET)
    assert (result.returncode, result.stdout) == (0, b"pop3d\n")
    assert b"Timed out" not in result.stderr  # the background sender got its answer
    assert wait_for(spool / "127.0.0.2")
    assert (spool / "127.0.0.2").read_bytes() == b"USER=alice\0DOMAIN=example.org\0"
    result = send("::1", receiver.port, SECRET)
    assert wait_for(spool / "::1"), result.stderr
    assert "IP 127.0.0.2 allowed to relay (from 127.0.0.1)" in receiver.text()


def test_refused_packets(tmp_path: Path, spool: Path, receivers: list[UdpReceiver]) -> None:
    receiver = start_receiver(tmp_path, spool, SECRET)
    receivers.append(receiver)
    now = time.time()
    secret = SECRET.encode()

    bad = rp.encode_request("127.0.0.3", now=now, secret=b"wrong secret")
    assert receiver.exchange(bad) is None
    unsigned = rp.encode_request("127.0.0.3", now=now)
    assert receiver.exchange(unsigned) is None
    stale = rp.encode_request("127.0.0.3", now=now - 120, secret=secret)
    assert receiver.exchange(stale) is None
    legacy = b"127.0.0.3"
    assert receiver.exchange(legacy) is None
    assert receiver.exchange(b"\x01garbage") is None
    assert not (spool / "127.0.0.3").exists()

    good = rp.encode_request("127.0.0.7", now=time.time(), env={"USER": "bob"}, secret=secret)
    answer = receiver.exchange(good, wait=10)
    assert answer is not None
    decoded = rp.decode(answer)
    assert decoded.response and rp.verify(decoded, secret)
    assert decoded.timestamp == rp.decode(good).timestamp
    assert (spool / "127.0.0.7").read_bytes() == b"USER=bob\0"
    (spool / "127.0.0.7").unlink()
    assert receiver.exchange(good) is None  # replayed
    assert not (spool / "127.0.0.7").exists()

    log = receiver.text()
    assert "refused packet from 127.0.0.1: bad signature" in log
    assert "refused packet from 127.0.0.1: unsigned" in log
    assert re.search(r"refused packet from 127\.0\.0\.1: timestamp 1\d\ds old \(limit 60s\)", log)
    assert "refused packet from 127.0.0.1: unsigned relay-ctrl 3.x packet" in log
    assert "refused packet from 127.0.0.1: malformed" in log
    assert "refused packet from 127.0.0.1: replayed (seen before)" in log


def test_sender_with_the_wrong_secret_times_out(
    tmp_path: Path, spool: Path, receivers: list[UdpReceiver],
) -> None:
    receiver = start_receiver(tmp_path, spool, SECRET)
    receivers.append(receiver)
    result = send("127.0.0.4", receiver.port, "not the secret", RELAY_CTRL_TRIES="1")
    assert (result.returncode, result.stdout) == (0, b"pop3d\n")  # the login goes on
    assert b"Timed out waiting for response from '127.0.0.1'." in result.stderr
    assert not (spool / "127.0.0.4").exists()
    assert "bad signature" in receiver.text()


def test_without_secret_relay_ctrl_3_senders_still_work(
    tmp_path: Path, spool: Path, receivers: list[UdpReceiver],
) -> None:
    receiver = start_receiver(tmp_path, spool, None)
    receivers.append(receiver)
    assert receiver.exchange(b"127.0.0.8", wait=10) == rp.LEGACY_ACK
    assert (spool / "127.0.0.8").read_bytes() == b""
    result = send("127.0.0.9", receiver.port, None, RELAY_CTRL_PACKET="legacy")
    assert b"Timed out" not in result.stderr
    assert wait_for(spool / "127.0.0.9")
    result = send("127.0.0.10", receiver.port, None)
    assert wait_for(spool / "127.0.0.10")
    assert (spool / "127.0.0.10").read_bytes() == b"USER=alice\0DOMAIN=example.org\0"


def test_send_checks_like_allow(tmp_path: Path) -> None:
    result = run([program("relay-ctrl-send"), "true"], {"TCPREMOTEIP": "../x"})
    assert result.returncode == 111
    assert b"Fatal: Invalid $TCPREMOTEIP '../x': not an IPv4 or IPv6 address." in result.stderr
    result = run([program("relay-ctrl-send"), "true"], {})
    assert result.returncode == 111 and b"Must be run from tcp-env or tcpserver." in result.stderr
    result = run([program("relay-ctrl-send"), "echo", "ok"], {"TCPREMOTEIP": "127.0.0.2"})
    assert result.stdout == b"ok\n" and b"$RELAY_CTRL_REMOTES is not set." in result.stderr
    courier = {"TCPREMOTEIP": "127.0.0.2", "AUTHUSER": "x", "AUTHARGV0": "imapd",
               "RELAY_CTRL_REMOTES": "127.0.0.1", "RELAY_CTRL_PORT": str(free_udp_port()),
               "RELAY_CTRL_TRIES": "1"}
    result = run([program("relay-ctrl-send"), "echo", "ok"], courier)
    assert result.stdout == b"ok\n" and b"Timed out" not in result.stderr  # nothing sent


# -- the receiver's decisions, without sockets --------------------------------------------


class _Say(Messages):
    def __init__(self) -> None:
        super().__init__("relay-ctrl-udp", show_pid=False)
        self.lines: list[str] = []

    def _write(self, kind: str, text: str) -> None:
        self.lines.append(kind + text)


def test_receiver_senders_list_and_foreign_env() -> None:
    store = MemoryStore()
    say = _Say()
    clock = [1000.0]
    receiver = Receiver(store, expiry=600, secret=b"k", say=say,
                        senders=frozenset({"192.0.2.1"}), clock=lambda: clock[0])
    packet = rp.encode_request("10.0.0.1", now=1000.0, secret=b"k",
                               env={"USER": "alice", "LD_PRELOAD": "/x.so"})
    assert receiver.handle(packet, "192.0.2.99") is None
    assert store.get("10.0.0.1", 1000.0) is None
    answer = receiver.handle(packet, "192.0.2.1")
    assert answer is not None and rp.decode(answer).response
    grant = store.get("10.0.0.1", 1000.0)
    assert grant is not None and grant.user == "alice" and grant.expires_at == 1600.0
    assert any("sender not in $RELAY_CTRL_SENDERS" in line for line in say.lines)
    assert any("also sets LD_PRELOAD: ignored" in line for line in say.lines)
    assert receiver.handle(rp.encode_response(b"1.0", b"k"), "192.0.2.1") is None
