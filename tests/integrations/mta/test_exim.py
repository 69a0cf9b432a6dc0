"""The real Exim (Debian's 4.96) asks ``relaygate policyd`` through ${readsocket} with
the ACL shipped in deploy/exim/.

Host-checking sessions (``exim -bh ADDRESS``) run whole SMTP dialogues through the
ACLs without a daemon, for any client address (IPv6 included); one daemon run
(``-bd -oX PORT``) checks the story end to end: a POP3 login to ``relaygate serve``
opens the relay for that address only, and the relayed message reaches a loopback sink.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mta_support import (
    EXIM,
    LOCAL_DOMAIN,
    RELAYGATE,
    REMOTE,
    TOP,
    Daemon,
    allow,
    exim_bh,
    exim_config,
    free_port,
    need,
    need_root,
    start_relaygate,
)

LOCAL = f"postmaster@{LOCAL_DOMAIN}"


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    # Exim switches to its own user: the spool must be reachable from /, which
    # pytest's 0700 temporary directories are not
    path = Path(tempfile.mkdtemp(prefix="relaygate-exim-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def policyd(root: Path) -> Iterator[tuple[Daemon, str, int]]:
    need(EXIM, "Exim")
    store = f"sqlite://{root / 'grants.db'}"
    port = free_port()
    daemon = start_relaygate(["--store", store, "policyd", "--listen", f"127.0.0.1:{port}"],
                             root / "policyd.err", port=port)
    allow(store, "127.0.0.5")
    allow(store, "2001:db8::7")
    yield daemon, store, port
    daemon.stop()


@pytest.fixture(scope="module")
def conf(root: Path, policyd: tuple[Daemon, str, int]) -> Path:
    return exim_config(root / "tcp", f"inet:127.0.0.1:{policyd[2]}")


def test_window_relays_stranger_does_not(conf: Path, policyd: tuple[Daemon, str, int]) -> None:
    assert exim_bh(conf, "127.0.0.5", [REMOTE, LOCAL]) == [250, 250]
    assert exim_bh(conf, "127.0.0.6", [REMOTE, LOCAL]) == [550, 250]
    log = policyd[0].text()
    assert "relay.decision service=policy ip=127.0.0.5 action=OK" in log


def test_ipv6_clients(conf: Path) -> None:
    # $sender_host_address has no ::ffff: prefix; relaygate canonicalises either way
    assert exim_bh(conf, "2001:db8::7", [REMOTE]) == [250]
    assert exim_bh(conf, "2001:DB8:0:0::7", [REMOTE]) == [250]
    assert exim_bh(conf, "2001:db8::8", [REMOTE, LOCAL]) == [550, 250]


def test_one_question_per_message(conf: Path, policyd: tuple[Daemon, str, int]) -> None:
    before = policyd[0].text().count("ip=127.0.0.5 action=OK")
    assert exim_bh(conf, "127.0.0.5", [REMOTE, "b@remote.test", "c@remote.test"]) == [250] * 3
    assert policyd[0].text().count("ip=127.0.0.5 action=OK") == before + 1


def test_window_revoked_no_relay(root: Path, conf: Path, policyd: tuple[Daemon, str, int]
                                 ) -> None:
    store = policyd[1]
    allow(store, "127.0.0.9")
    assert exim_bh(conf, "127.0.0.9", [REMOTE]) == [250]
    subprocess.run([RELAYGATE, "--store", store, "revoke", "127.0.0.9"], check=True,
                   capture_output=True, timeout=60)
    assert exim_bh(conf, "127.0.0.9", [REMOTE]) == [550]


def test_service_down_means_no_relay_but_local_mail_flows(root: Path) -> None:
    dead = free_port()  # nothing listens there
    conf = exim_config(root / "dead", f"inet:127.0.0.1:{dead}")
    # would-be relays are deferred (451: the client retries), local mail is accepted
    assert exim_bh(conf, "127.0.0.5", [REMOTE, LOCAL]) == [451, 250]
    assert exim_bh(conf, "2001:db8::7", [REMOTE]) == [451]


def test_store_down_means_no_relay(root: Path) -> None:
    # policyd up, its Redis store unreachable: DUNNO, so Exim's relay check refuses
    port = free_port()
    dead = free_port()
    daemon = start_relaygate(["--store", f"redis://127.0.0.1:{dead}/0", "policyd",
                              "--listen", f"127.0.0.1:{port}"], root / "policyd-redis.err",
                             port=port)
    try:
        conf = exim_config(root / "redisdown", f"inet:127.0.0.1:{port}")
        assert exim_bh(conf, "127.0.0.5", [REMOTE, LOCAL]) == [550, 250]
    finally:
        daemon.stop()


def test_silent_service_times_out_to_no_relay(root: Path) -> None:
    with socket.socket() as s:  # accepts connections, never answers
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        conf = exim_config(root / "silent", f"inet:127.0.0.1:{s.getsockname()[1]}",
                           timeout="1s")
        start = time.monotonic()
        assert exim_bh(conf, "127.0.0.5", [REMOTE, LOCAL]) == [451, 250]
        assert time.monotonic() - start < 30


def test_unix_socket_variant(root: Path, policyd: tuple[Daemon, str, int]) -> None:
    sock = root / "policy.sock"
    daemon = start_relaygate(["--store", policyd[1], "policyd", "--listen", f"unix:{sock}",
                              "--socket-group", "Debian-exim"], root / "policyd-unix.err",
                             path=sock)
    try:
        conf = exim_config(root / "unix", str(sock))
        assert exim_bh(conf, "127.0.0.5", [REMOTE]) == [250]
        assert exim_bh(conf, "127.0.0.6", [REMOTE]) == [550]
    finally:
        daemon.stop()


def test_without_the_acl_nobody_relays(root: Path) -> None:
    conf = exim_config(root / "plain", "inet:127.0.0.1:1", include_acl=False)
    assert exim_bh(conf, "127.0.0.5", [REMOTE, LOCAL]) == [550, 250]


# -- one daemon run, end to end ------------------------------------------------------


def test_exim_daemon_pop3_login_opens_relay_for_that_address(root: Path) -> None:
    need_root("an Exim daemon")
    exim = need(EXIM, "Exim")
    sys_path = str(TOP / "tests" / "interop")
    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from serve_harness import Serve, Sink, pop3_login

    work = root / "e2e"
    work.mkdir()
    policy_port = free_port()
    serve = Serve(work / "serve", services=("pop3",),
                  extra=("--policy", f"127.0.0.1:{policy_port}"), expiry=600)
    serve.add_user("alice", "s3cret-pw")
    serve.start()
    exim_proc = None
    try:
        with Sink() as sink:
            routers = f"""
sink:
  driver = manualroute
  domains = ! +local_domains
  transport = sink_smtp
  route_list = * 127.0.0.1::{sink.port} byname
  self = send

local:
  driver = accept
  domains = +local_domains
  transport = local_devnull
"""
            conf = exim_config(work / "exim", f"inet:127.0.0.1:{policy_port}",
                               routers=routers,
                               extra_main="local_interfaces = 127.0.0.1\n"
                                          "queue_run_in_order = true\n")
            port = free_port()
            exim_proc = subprocess.Popen(
                [exim, "-C", str(conf), "-bdf", "-oX", str(port), "-odi"],
                stdout=subprocess.DEVNULL, stderr=open(work / "exim.err", "wb"))
            deadline = time.monotonic() + 30
            while True:
                try:
                    smtplib.SMTP("127.0.0.1", port, timeout=5).quit()
                    break
                except OSError:
                    assert exim_proc.poll() is None, (work / "exim.err").read_text()
                    assert time.monotonic() < deadline, "Exim did not listen"
                    time.sleep(0.1)

            def relay(source: str, marker: str) -> int:
                client = smtplib.SMTP(timeout=30, local_hostname="client.test",
                                      source_address=(source, 0))
                client.connect("127.0.0.1", port)
                try:
                    client.ehlo()
                    client.mail("alice@client.test")
                    code, _ = client.rcpt(REMOTE)
                    if code == 250:
                        client.data(f"Subject: {marker}\r\n\r\n{marker}\r\n".encode())
                    return int(code)
                finally:
                    client.quit()

            assert relay("127.0.0.7", "before-login") == 550
            assert pop3_login("127.0.0.7", "127.0.0.1", serve.ports["pop3"],
                              "alice@example.org", "s3cret-pw")
            assert relay("127.0.0.7", "after-login-7") == 250
            assert relay("127.0.0.8", "stranger-8") == 550  # another client: still closed
            try:
                _, rcpts, _ = sink.wait_for("after-login-7", timeout=60)
            except AssertionError:
                logs = work / "exim" / "log"
                raise AssertionError("; ".join(p.read_text(errors="replace")
                                               for p in logs.iterdir())) from None
            assert rcpts == [REMOTE]
            assert b"stranger-8" not in b"".join(m[2] for m in sink.messages)
    finally:
        if exim_proc is not None:
            exim_proc.send_signal(signal.SIGTERM)
            try:
                exim_proc.wait(15)
            except subprocess.TimeoutExpired:
                exim_proc.kill()
                exim_proc.wait()
        serve.stop()
    shutil.rmtree(work / "exim" / "spool", ignore_errors=True)
