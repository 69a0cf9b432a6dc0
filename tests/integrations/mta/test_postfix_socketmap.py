"""Postfix asks ``relaygate socketmap`` through ``check_client_access socketmap:...``,
the alternative to the policy service (docs/postfix-dovecot.md).

``postmap -q`` queries the table the way smtpd does; a private Postfix daemon with the
restriction relays for a window and refuses a stranger; ``relaygate serve
--socketmap`` runs the same service.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mta_support import (
    RELAYGATE,
    TOP,
    Daemon,
    _load,
    allow,
    free_port,
    have_ipv6_loopback,
    start_relaygate,
)

testbed = _load("_postfix_testbed", TOP / "bench" / "_postfix_testbed.py")
pfdc = _load("relaygate_pfdc_support",
             TOP / "tests" / "integrations" / "postfix_dovecot" / "pfdc_support.py")


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = testbed.make_root("relaygate-pfsm-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def service(root: Path) -> Iterator[tuple[Daemon, str, int]]:
    pfdc.need_program("postmap", "/usr/sbin/postmap")
    store = f"sqlite://{root / 'grants.db'}"
    port = free_port()
    daemon = start_relaygate(["--store", store, "socketmap", "--listen", f"127.0.0.1:{port}"],
                             root / "socketmap.err", port=port)
    allow(store, "127.0.0.3")
    allow(store, "2001:db8::5")
    yield daemon, store, port
    daemon.stop()


def postmap(root: Path, table: str, key: str) -> tuple[int, str]:
    etc = root / "postmap-etc"
    if not etc.exists():
        etc.mkdir()
        (etc / "main.cf").write_text("compatibility_level = 3.6\nmaillog_file = /dev/stdout\n")
    out = subprocess.run([pfdc.need_program("postmap", "/usr/sbin/postmap"), "-c", str(etc),
                          "-q", key, table], capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout.strip() + out.stderr.strip()


def test_postmap_queries(root: Path, service: tuple[Daemon, str, int]) -> None:
    table = f"socketmap:inet:127.0.0.1:{service[2]}:relaygate"
    assert postmap(root, table, "127.0.0.3") == (0, "OK")
    assert postmap(root, table, "2001:db8::5")[0:2] == (0, "OK")
    assert postmap(root, table, "127.0.0.4")[0] == 1  # not found
    assert postmap(root, table, "2001:db8::6")[0] == 1


def test_postmap_store_down_is_a_lookup_error_not_ok(root: Path) -> None:
    port = free_port()
    daemon = start_relaygate(["--store", f"redis://127.0.0.1:{free_port()}/0", "socketmap",
                              "--listen", f"127.0.0.1:{port}"], root / "sm-redis.err",
                             port=port)
    try:
        code, text = postmap(root, f"socketmap:inet:127.0.0.1:{port}:relaygate", "127.0.0.3")
        # not found would be a silent exit 1; this is a table error (smtpd: 451)
        assert code != 0, text
        assert "temporary error: relaygate: grant store unreachable" in text, text
        assert "query error" in text, text
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def postfix(root: Path, service: tuple[Daemon, str, int]) -> Iterator[testbed.PostfixTestbed]:
    pfdc.need_servers()
    ipv6 = have_ipv6_loopback()
    (root / "postfix").mkdir()
    pf = testbed.PostfixTestbed(
        root / "postfix", port=testbed.free_port(),
        v6_port=testbed.free_port("::1") if ipv6 else None,
        relay_restrictions=("permit_mynetworks, "
                            f"check_client_access socketmap:inet:127.0.0.1:{service[2]}:relaygate,"
                            " reject_unauth_destination"),
        mynetworks="127.0.0.1/32")
    pf.configure()
    pf.start()
    yield pf
    pf.stop()


def test_postfix_relays_for_a_window_only(postfix: testbed.PostfixTestbed,
                                          service: tuple[Daemon, str, int]) -> None:
    remote = f"x@{testbed.REMOTE_DOMAIN}"
    local = f"alice@{testbed.LOCAL_DOMAIN}"
    assert testbed.smtp_rcpt("127.0.0.3", "127.0.0.1", postfix.port, remote)[0] == 250
    assert testbed.smtp_rcpt("127.0.0.4", "127.0.0.1", postfix.port, remote)[0] == 554
    assert testbed.smtp_rcpt("127.0.0.4", "127.0.0.1", postfix.port, local)[0] == 250
    allow(service[1], "127.0.0.4", ttl=60)
    assert testbed.smtp_rcpt("127.0.0.4", "127.0.0.1", postfix.port, remote)[0] == 250
    subprocess.run([RELAYGATE, "--store", service[1], "revoke", "127.0.0.4"], check=True,
                   capture_output=True, timeout=60)
    assert testbed.smtp_rcpt("127.0.0.4", "127.0.0.1", postfix.port, remote)[0] == 554


def test_postfix_ipv6_client(postfix: testbed.PostfixTestbed,
                             service: tuple[Daemon, str, int]) -> None:
    if postfix.v6_port is None:
        pytest.skip("no IPv6 loopback")
    remote = f"x@{testbed.REMOTE_DOMAIN}"
    assert testbed.smtp_rcpt("::1", "::1", postfix.v6_port, remote)[0] == 554
    allow(service[1], "::1", ttl=60)
    assert testbed.smtp_rcpt("::1", "::1", postfix.v6_port, remote)[0] == 250


def test_serve_runs_the_socketmap_service(root: Path) -> None:
    port = free_port()
    sock = root / "serve-sm.sock"
    store = f"sqlite://{root / 'serve.db'}"
    allow(store, "192.0.2.80")
    work = Path(tempfile.mkdtemp(prefix="relaygate-serve-sm-"))
    try:
        daemon = start_relaygate(
            ["serve", "--data-dir", str(work / "data"), "--store", store, "--smtp", "off",
             "--submission", "off", "--pop3", "off", "--imap", "off",
             "--socketmap", f"127.0.0.1:{port}", "--socketmap", f"unix:{sock}"],
            work / "serve.err", port=port)
        try:
            table = f"socketmap:inet:127.0.0.1:{port}:relaygate"
            assert postmap(root, table, "192.0.2.80") == (0, "OK")
            assert postmap(root, table, "192.0.2.81")[0] == 1
            assert postmap(root, f"socketmap:unix:{sock}:relaygate", "192.0.2.80") == (0, "OK")
        finally:
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(30) == 0, daemon.text()
        assert not sock.exists()
        assert "relay.decision service=socketmap ip=192.0.2.80 action=OK" in daemon.text()
    finally:
        shutil.rmtree(work, ignore_errors=True)
