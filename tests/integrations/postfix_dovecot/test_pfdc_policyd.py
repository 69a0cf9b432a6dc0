"""``relaygate policyd`` as a process: UNIX socket for the real Postfix, signals, errors."""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import _postfix_testbed as testbed
import pytest

from relaygate.protocols.policy import format_request

from .pfdc_support import RELAYGATE, need_servers


@pytest.fixture(scope="module")
def unix_stack(root: Path) -> Iterator[tuple[testbed.PostfixTestbed, Path, str,
                                             subprocess.Popen[bytes]]]:
    need_servers()
    store = f"sqlite://{root / 'grants.db'}"
    sock = root / "policy.sock"
    log = root / "policyd.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [RELAYGATE, "--store", store, "policyd", "--listen", f"unix:{sock}",
             "--socket-group", "postfix"], stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    (root / "postfix").mkdir()
    postfix = testbed.PostfixTestbed(
        root / "postfix", port=testbed.free_port(),
        relay_restrictions=f"check_policy_service unix:{sock}, reject_unauth_destination")
    postfix.configure()
    postfix.start()
    yield postfix, sock, store, proc
    postfix.stop()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_postfix_asks_over_a_unix_socket(unix_stack: tuple[testbed.PostfixTestbed, Path, str,
                                                           subprocess.Popen[bytes]]) -> None:
    postfix, sock, store, _ = unix_stack
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam("postfix").gr_gid
    remote = f"x@{testbed.REMOTE_DOMAIN}"
    assert testbed.smtp_rcpt("127.0.0.3", "127.0.0.1", postfix.port, remote)[0] == 554
    subprocess.run([RELAYGATE, "--store", store, "allow", "127.0.0.3", "--ttl", "60"],
                   check=True, capture_output=True, timeout=30)
    code, msg = testbed.smtp_rcpt("127.0.0.3", "127.0.0.1", postfix.port, remote)
    assert code == 250, f"{msg}\n{postfix.log_tail()}"


def test_garbage_over_the_socket_gets_no_answer(
        unix_stack: tuple[testbed.PostfixTestbed, Path, str, subprocess.Popen[bytes]]) -> None:
    _, sock, _, _ = unix_stack
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"request=smtpd_access_policy\nclient_address=1.2.3.4\nclient_address=5.6.7.8"
                  b"\n\n")
        assert s.recv(100) == b""


def test_sigterm_removes_the_socket(
        unix_stack: tuple[testbed.PostfixTestbed, Path, str, subprocess.Popen[bytes]]) -> None:
    _, sock, _, proc = unix_stack
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not sock.exists()


def test_bind_failure_exits_111(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([RELAYGATE, "--store", "memory:", "policyd", "--listen",
                              f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 111
    assert "cannot listen" in out.stderr


def expect_answers(s: socket.socket, asks: list[tuple[str, bytes]]) -> None:
    """Ask about each address in turn on one connection; each answer must be as given."""
    f = s.makefile("rb")
    for ip, want in asks:
        s.sendall(format_request({"request": "smtpd_access_policy", "client_address": ip}))
        assert f.readline() == b"action=" + want + b"\n"
        assert f.readline() == b"\n"


def test_tcp_policyd_answers_many_requests_per_connection(tmp_path: Path) -> None:
    port = testbed.free_port()
    store = f"sqlite://{tmp_path / 'g.db'}"
    subprocess.run([RELAYGATE, "--store", store, "allow", "::1", "--ttl", "60"], check=True,
                   capture_output=True, timeout=30)
    proc = subprocess.Popen([RELAYGATE, "--store", store, "policyd", "--listen",
                             f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    try:
        testbed.wait_port("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            expect_answers(s, [("::1", b"OK"), ("127.0.0.2", b"DUNNO")] * 50)
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_runs_the_policy_service_when_enabled(tmp_path: Path) -> None:
    """`relaygate serve` with only [policy] listen (as deploy/examples/postfix-dovecot.toml)."""
    port = testbed.free_port()
    sock = tmp_path / "policy.sock"
    store = f"sqlite://{tmp_path / 'g.db'}"
    cfg = tmp_path / "relaygate.toml"
    cfg.write_text(f"""\
data_dir = "{tmp_path / 'data'}"
store = "{store}"
[smtp]
listen = []
submission = []
smtps = []
[pop3]
listen = []
listen_tls = []
[imap]
listen = []
listen_tls = []
[policy]
listen = ["127.0.0.1:{port}", "unix:{sock}"]
""")
    subprocess.run([RELAYGATE, "--store", store, "allow", "192.0.2.80", "--ttl", "600"],
                   check=True, capture_output=True, timeout=30)
    log = tmp_path / "serve.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen([RELAYGATE, "serve", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        try:
            testbed.wait_port("127.0.0.1", port)
        except OSError:
            raise AssertionError(log.read_text()) from None
        for family, address in ((socket.AF_INET, ("127.0.0.1", port)),
                                (socket.AF_UNIX, str(sock))):
            with socket.socket(family) as s:
                s.settimeout(10)
                s.connect(address)
                expect_answers(s, [("192.0.2.80", b"OK"), ("192.0.2.81", b"DUNNO")] * 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert not sock.exists()
    assert 'relayed service=policy ip=192.0.2.80 action=OK' in log.read_text()
