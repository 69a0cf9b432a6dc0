"""The seed's scenario against a running ``relaygate serve`` (real sockets, real pieces):

a client at 127.0.0.3 cannot relay (553) but can deliver locally; a POP3 login opens
the window; relaying is then accepted and reaches a loopback sink through smtproutes;
after the window expires (2 s) relaying is refused again; an IMAP login does the same;
a static-rule address always relays; the same over ::1. Plus status, metrics, revoke,
SIGTERM with transactions in flight, and a second instance refused.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_harness import (
    LineClient,
    Serve,
    Sink,
    env,
    free_port,
    imap_login,
    me,
    pop3_login,
    smtp,
    try_relay,
)

from conftest import have_ipv6_loopback

EXPIRY = 2.0
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, sink: Sink) -> Iterator[Serve]:
    hosts: tuple[str, ...] = ("127.0.0.1", "::1") if have_ipv6_loopback() else ("127.0.0.1",)
    metrics = free_port()
    s = Serve(tmp_path_factory.mktemp("serve"), expiry=EXPIRY,
              rules='127.0.0.10:allow,RELAYCLIENT=""\n',
              smtproutes=f"example.net:127.0.0.1:{sink.port}\n", hosts=hosts,
              extra=("--metrics", f"127.0.0.1:{metrics}"))
    s.metrics_port = metrics  # type: ignore[attr-defined]
    s.add_user("alice", PASSWORD)
    s.start()
    yield s
    rc = s.stop()
    assert rc == 0, s.log()


def _marker() -> str:
    return f"m-{uuid.uuid4().hex}"


def _wait_refused(s: Serve, source: str, host: str = "127.0.0.1") -> int:
    """Poll until the window of ``source`` has expired; returns the RCPT code then."""
    deadline = time.monotonic() + EXPIRY + 10
    while True:
        code, _ = try_relay(source, host, s.ports["smtp"])
        if code != 250 or time.monotonic() > deadline:
            return code
        time.sleep(0.25)


def test_no_window_no_relay_but_local_delivery(serve: Serve) -> None:
    code, msg = try_relay("127.0.0.3", "127.0.0.1", serve.ports["smtp"])
    assert code == 553, msg
    assert "5.7.1" in msg
    before = serve.maildir_count("alice")
    with smtp("127.0.0.3", "127.0.0.1", serve.ports["smtp"]) as c:
        c.mail("someone@example.com")
        assert c.rcpt("alice@example.org")[0] == 250
        assert c.data("Subject: local\r\n\r\nhello alice\r\n")[0] == 250
    assert serve.maildir_count("alice") == before + 1


def test_pop3_login_opens_the_window_until_it_expires(serve: Serve, sink: Sink) -> None:
    src = "127.0.0.3"
    assert try_relay(src, "127.0.0.1", serve.ports["smtp"])[0] == 553
    assert pop3_login(src, "127.0.0.1", serve.ports["pop3"], "alice", PASSWORD)
    marker = _marker()
    code, msg = try_relay(src, "127.0.0.1", serve.ports["smtp"], body=marker)
    assert code == 250, msg
    mail_from, rcpts, _data = sink.wait_for(marker)
    assert rcpts == ["bob@example.net"] and mail_from == "alice@example.org"
    # the grant names its user
    r = serve.relaygate("list", "--json")
    grants = {g["ip"]: g for g in json.loads(r.stdout)}
    assert grants[src]["user"] == "alice" and grants[src]["source"] == "pop3"
    time.sleep(EXPIRY)
    assert _wait_refused(serve, src) == 553


def test_wrong_password_opens_nothing(serve: Serve) -> None:
    assert not pop3_login("127.0.0.4", "127.0.0.1", serve.ports["pop3"], "alice", "wrong")
    assert try_relay("127.0.0.4", "127.0.0.1", serve.ports["smtp"])[0] == 553


def test_imap_login_opens_the_window_until_it_expires(serve: Serve, sink: Sink) -> None:
    src = "127.0.0.5"
    assert try_relay(src, "127.0.0.1", serve.ports["smtp"])[0] == 553
    assert imap_login(src, "127.0.0.1", serve.ports["imap"], "alice", PASSWORD)
    marker = _marker()
    assert try_relay(src, "127.0.0.1", serve.ports["smtp"], body=marker)[0] == 250
    sink.wait_for(marker)
    time.sleep(EXPIRY)
    assert _wait_refused(serve, src) == 553


def test_static_rule_address_always_relays(serve: Serve, sink: Sink) -> None:
    marker = _marker()
    code, msg = try_relay("127.0.0.10", "127.0.0.1", serve.ports["smtp"], body=marker)
    assert code == 250, msg
    sink.wait_for(marker)
    # and it never needed a window
    r = serve.relaygate("list", "--json")
    assert "127.0.0.10" not in {g["ip"] for g in json.loads(r.stdout)}


def test_revoke_closes_the_window(serve: Serve) -> None:
    src = "127.0.0.6"
    assert pop3_login(src, "127.0.0.1", serve.ports["pop3"], "alice", PASSWORD)
    assert try_relay(src, "127.0.0.1", serve.ports["smtp"])[0] == 250
    r = serve.relaygate("revoke", src)
    assert r.returncode == 0, r.stderr
    assert try_relay(src, "127.0.0.1", serve.ports["smtp"])[0] == 553


def test_same_over_ipv6(serve: Serve, sink: Sink) -> None:
    if not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    port = serve.ports["smtp"]
    assert try_relay("::1", "::1", port)[0] == 553
    with smtp("::1", "::1", port) as c:
        c.mail("someone@example.com")
        assert c.rcpt("alice@example.org")[0] == 250
    assert pop3_login("::1", "::1", serve.ports["pop3"], "alice", PASSWORD)
    marker = _marker()
    assert try_relay("::1", "::1", port, body=marker)[0] == 250
    sink.wait_for(marker)
    grants = {g["ip"]: g for g in json.loads(serve.relaygate("list", "--json").stdout)}
    assert grants["::1"]["user"] == "alice"
    assert serve.relaygate("revoke", "::1").returncode == 0
    assert try_relay("::1", "::1", port)[0] == 553
    assert imap_login("::1", "::1", serve.ports["imap"], "alice", PASSWORD)
    assert try_relay("::1", "::1", port)[0] == 250
    serve.relaygate("revoke", "::1")


def test_status_and_metrics_of_the_running_serve(serve: Serve) -> None:
    assert pop3_login("127.0.0.7", "127.0.0.1", serve.ports["pop3"], "alice", PASSWORD)
    r = serve.relaygate("status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["serve"]["state"] == "running"
    names = {s["name"]: s["listeners"] for s in doc["serve"]["services"]}
    assert f"127.0.0.1:{serve.ports['smtp']}" in names["smtp"]
    assert f"127.0.0.1:{serve.ports['pop3']}" in names["pop3"]
    assert f"127.0.0.1:{serve.ports['imap']}" in names["imap"]
    assert "queue" in names
    assert doc["windows"]["count"] >= 1
    assert doc["windows"]["newest"]["ip"] == "127.0.0.7"
    assert "queued" in doc["queue"]
    text = serve.relaygate("status").stdout
    assert "serve: running" in text and "windows:" in text and "queue:" in text
    port = serve.metrics_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    assert 'relaygate_logins_total{protocol="pop3",result="ok"}' in body
    assert "relaygate_relay_decisions_total" in body
    assert 'relaygate_windows_total{event="opened"}' in body


def test_second_instance_is_refused(serve: Serve) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "relaygate", "serve", "--data-dir", str(serve.data_dir),
         "--user", me(), "--smtp", f"127.0.0.1:{free_port()}", "--pop3", "off",
         "--imap", "off", "--submission", "off"],
        capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 111
    assert "already running" in r.stderr
    assert str(serve.proc.pid) in r.stderr  # type: ignore[union-attr]
    assert try_relay("127.0.0.3", "127.0.0.1", serve.ports["smtp"])[0] == 553


def test_sigterm_loses_nothing(tmp_path: Path) -> None:
    """Messages answered 250 before exit are on disk; one still in DATA either completes
    (and is on disk) or gets an error, never a 250 for a lost message."""
    s = Serve(tmp_path / "t", services=("smtp",))
    s.add_user("alice", PASSWORD)
    s.start()
    try:
        results: list[tuple[str, int]] = []
        lock = threading.Lock()
        started = threading.Barrier(6)

        def sender(i: int) -> None:
            tag = f"msg-{i}"
            try:
                c = smtp("127.0.0.3", "127.0.0.1", s.ports["smtp"], timeout=60)
                c.mail("x@example.com")
                c.rcpt("alice@example.org")
                c.putcmd("DATA")
                assert c.getreply()[0] == 354
                c.send(f"Subject: {tag}\r\n\r\n".encode())
                started.wait(30)
                time.sleep(0.5 + i * 0.1)  # SIGTERM arrives while this message is in DATA
                c.send(b"body line\r\n" * 1000 + b".\r\n")
                code = c.getreply()[0]
                with lock:
                    results.append((tag, code))
                try:
                    c.quit()
                except (smtplib.SMTPException, OSError):
                    pass
            except (smtplib.SMTPException, OSError):
                with lock:
                    results.append((tag, -1))

        # one message fully accepted before the signal
        with smtp("127.0.0.3", "127.0.0.1", s.ports["smtp"]) as c:
            c.sendmail("x@example.com", ["alice@example.org"], "Subject: before\r\n\r\nb\r\n")
        threads = [threading.Thread(target=sender, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        started.wait(30)
        s.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for t in threads:
            t.join(90)
        assert s.proc.wait(90) == 0, s.log()  # type: ignore[union-attr]
    finally:
        s.stop()
    maildir = s.data_dir / "mail" / "example.org" / "alice"
    stored = b"".join(p.read_bytes() for sub in ("new", "cur") for p in (maildir / sub).iterdir())
    assert b"Subject: before" in stored
    assert len(results) == 5
    # the grace period (30 s) covers them all: each transaction in flight completes
    assert [code for _, code in results] == [250] * 5, results
    for tag, code in results:
        if code == 250:
            assert f"Subject: {tag}".encode() in stored, f"{tag} acknowledged but lost"
        else:
            assert code == -1 or 400 <= code < 600
    # every stored message is whole
    for sub in ("new", "cur"):
        for p in (maildir / sub).iterdir():
            data = p.read_bytes()
            assert data.endswith(b"\n")
            if b"msg-" in data:
                assert data.count(b"body line") == 1000


def test_pop3_session_survives_and_window_works_after_sighup(serve: Serve) -> None:
    # SIGHUP reloads rules/users/TLS without dropping a session in progress
    c = LineClient("127.0.0.8", "127.0.0.1", serve.ports["pop3"])
    try:
        assert c.line().startswith(b"+OK")
        serve.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        time.sleep(0.5)
        c.send("USER alice")
        assert c.line().startswith(b"+OK")
        c.send(f"PASS {PASSWORD}")
        assert c.line().startswith(b"+OK")
        c.send("QUIT")
        c.line()
    finally:
        c.close()
    assert try_relay("127.0.0.8", "127.0.0.1", serve.ports["smtp"])[0] == 250
    assert "serve.reloaded" in serve.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_real_services_after_dropping_root(sink: Sink) -> None:
    """As root with --user nobody: bind, drop, and everything still works as nobody."""
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="relaygate-e2e-"))
    os.chmod(base, 0o755)  # nobody must reach the data directory
    try:
        s = Serve(base / "w", user="nobody",
                  smtproutes=f"example.net:127.0.0.1:{sink.port}\n")
        os.chmod(s.workdir, 0o755)
        s.add_user("alice", PASSWORD)  # as root: serve hands the files to nobody
        s.start()
        try:
            status = Path(f"/proc/{s.proc.pid}/status").read_text()  # type: ignore[union-attr]
            uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
            assert uids == [str(nobody.pw_uid)] * 4
            assert pop3_login("127.0.0.3", "127.0.0.1", s.ports["pop3"], "alice", PASSWORD)
            marker = _marker()
            assert try_relay("127.0.0.3", "127.0.0.1", s.ports["smtp"], body=marker)[0] == 250
            sink.wait_for(marker)
            with smtp("127.0.0.4", "127.0.0.1", s.ports["smtp"]) as c:
                c.sendmail("x@example.com", ["alice@example.org"], "Subject: l\r\n\r\nl\r\n")
            assert s.maildir_count("alice") == 1
        finally:
            rc = s.stop()
        assert rc == 0, s.log()
        for p in (s.data_dir, s.data_dir / "users.db", s.data_dir / "grants.db",
                  s.data_dir / "mail" / "example.org" / "alice" / "new"):
            assert p.stat().st_uid == nobody.pw_uid, p
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_tls_certificate_reloaded_on_sighup(tmp_path: Path) -> None:
    """The real SMTP service shares serve's SSLContext: SIGHUP swaps the certificate."""
    import ssl

    import trustme

    def write(ca: trustme.CA) -> None:
        cert = ca.issue_cert("mail.example.org")
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))

    def greeting(ca: trustme.CA, port: int) -> bytes:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="mail.example.org") as tls:
            return tls.recv(100)

    ca1, ca2 = trustme.CA(), trustme.CA()
    write(ca1)
    smtps = free_port()
    s = Serve(tmp_path / "w", services=("smtp",),
              extra=("--tls-cert", str(tmp_path / "cert.pem"),
                     "--tls-key", str(tmp_path / "key.pem"),
                     "--smtps", f"127.0.0.1:{smtps}", "--pop3s", "off", "--imaps", "off"))
    s.start()
    try:
        assert greeting(ca1, smtps).startswith(b"220")
        write(ca2)
        s.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while "serve.reloaded" not in s.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "tls" in s.log().split("serve.reloaded", 1)[1].splitlines()[0]
        assert greeting(ca2, smtps).startswith(b"220")
        with pytest.raises(ssl.SSLError):
            greeting(ca1, smtps)
    finally:
        rc = s.stop()
    assert rc == 0, s.log()


def _shape(line: str) -> tuple[str, ...]:
    """A log line's event (with a level word before it) and its keys, in order."""
    import re

    text = re.sub(r"^relaygate\[\d+\]: ", "", line)
    words = re.findall(r'(\w[\w.]*)=("(?:[^"\\]|\\.)*"|\S*)|(\S+)', text)
    head = tuple(w[2] for w in words[:2] if w[2])
    return head + tuple(w[0] for w in words if w[0])


def test_the_log_lines_in_docs_deploy_are_real(serve: Serve, sink: Sink) -> None:
    # docs/deploy.md shows what serve logs; every sample line must have the event and keys,
    # in order, of a line this serve really wrote (issue 17: the samples had drifted).
    src = "127.0.0.6"
    assert not pop3_login(src, "127.0.0.1", serve.ports["pop3"], "alice", "wrong")
    assert pop3_login(src, "127.0.0.1", serve.ports["pop3"], "alice", PASSWORD)
    marker = _marker()
    assert try_relay(src, "127.0.0.1", serve.ports["smtp"], body=marker)[0] == 250
    sink.wait_for(marker)
    with smtp("127.0.0.7", "127.0.0.1", serve.ports["smtp"]) as c:
        c.mail("someone@example.com")
        assert c.rcpt("alice@example.org")[0] == 250
        assert c.data("Subject: local\r\n\r\nhello\r\n")[0] == 250
    assert try_relay("127.0.0.8", "127.0.0.1", serve.ports["smtp"])[0] == 553
    doc = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    block = doc.split("#### Logs", 1)[1].split("```", 2)[1]
    samples = [line for line in block.splitlines() if line.startswith("relaygate[")]
    assert len(samples) >= 8
    deadline = time.monotonic() + 10
    while True:
        real = {_shape(line) for line in serve.log().splitlines()}
        missing = [s for s in samples if _shape(s) not in real]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, (missing, sorted(real))
