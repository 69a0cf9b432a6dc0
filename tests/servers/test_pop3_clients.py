"""Real POP3 clients from Debian against the POP3 service: curl and fetchmail.

Each test starts the service on a loopback port, runs the client, and checks
both what the client got and the relay window the login opened (exactly the
client's address, the right user), and the Maildir afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from pop3_harness import CHEAP, POP3From, Pop3Harness, start_pop3

from conftest import free_port, need_program, wait_port
from relaygate.config import AuthSettings
from relaygate.mail.accounts.db import UserDB
from relaygate.mail.maildir import deliver

MSG1 = b"From: a@example.test\nSubject: one\n\n.dotted\nbody one\n"
MSG2 = b"From: b@example.test\r\nSubject: two\r\n\r\nbody two\r\n"


async def run(*argv: str, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(subprocess.run, list(argv), capture_output=True,
                                   timeout=timeout, env=env)


@pytest.fixture
async def pop(tmp_path: Path) -> AsyncIterator[Pop3Harness]:
    h = await start_pop3(tmp_path)
    h.db.add("alice", "alice-pw", apop=True)
    yield h
    await h.stop()


def maildir(h: Pop3Harness) -> Path:
    account = h.db.find_account("alice")
    assert account is not None
    return account.maildir


async def test_curl_sasl_plain_retr(pop: Pop3Harness) -> None:
    curl = need_program("curl")
    deliver(maildir(pop), MSG1)
    p2 = deliver(maildir(pop), MSG2)
    r = await run(curl, "-sS", "--interface", "127.0.0.2", "-u", "alice:alice-pw",
                  f"pop3://127.0.0.1:{pop.port()}/2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == MSG2
    g = pop.grant("127.0.0.2")
    assert g is not None and (g.user, g.domain, g.source) == ("alice", "example.test", "pop3")
    assert [x.ip for x in pop.store.list(0)] == ["127.0.0.2"]
    # curl's RETR marked the message seen
    assert not p2.exists() and (maildir(pop) / "cur" / f"{p2.name}:2,S").exists()


async def test_curl_list_with_initial_response(pop: Pop3Harness) -> None:
    curl = need_program("curl")
    deliver(maildir(pop), MSG1)
    r = await run(curl, "-sS", "--sasl-ir", "--interface", "127.0.0.3", "-u",
                  "alice:alice-pw", f"pop3://127.0.0.1:{pop.port()}/")
    assert r.returncode == 0, r.stderr
    size = len(MSG1) + MSG1.count(b"\n")
    assert r.stdout == f"1 {size}\r\n".encode()
    assert pop.grant("127.0.0.3") is not None


async def test_curl_apop(pop: Pop3Harness) -> None:
    curl = need_program("curl")
    secret = pop.db.apop_secret("alice")
    assert secret
    r = await run(curl, "-sS", "--interface", "127.0.0.4", "-u", f"alice:{secret}",
                  "--login-options", "AUTH=+APOP", f"pop3://127.0.0.1:{pop.port()}/")
    assert r.returncode == 0, r.stderr
    g = pop.grant("127.0.0.4")
    assert g is not None and g.user == "alice"


async def test_curl_wrong_password_grants_nothing(pop: Pop3Harness) -> None:
    curl = need_program("curl")
    r = await run(curl, "-sS", "--interface", "127.0.0.5", "-u", "alice:wrong",
                  f"pop3://127.0.0.1:{pop.port()}/")
    assert r.returncode == 67  # CURLE_LOGIN_DENIED
    assert pop.store.list(0) == []


async def test_curl_stls_and_pop3s(tmp_path: Path) -> None:
    curl = need_program("curl")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    ca.cert_pem.write_to_path(ca_path)
    h = await start_pop3(tmp_path, tls=(cert_path, key_path), listen_tls=("127.0.0.1:0",))
    h.db.add("alice", "alice-pw")
    deliver(maildir(h), MSG2)
    try:
        r = await run(curl, "-sS", "--ssl-reqd", "--cacert", str(ca_path), "--interface",
                      "127.0.0.6", "-u", "alice:alice-pw", f"pop3://127.0.0.1:{h.port()}/1")
        assert r.returncode == 0, r.stderr
        assert r.stdout == MSG2
        assert h.grant("127.0.0.6") is not None
        r = await run(curl, "-sS", "--cacert", str(ca_path), "--interface", "127.0.0.7",
                      "-u", "alice:alice-pw", f"pop3s://127.0.0.1:{h.port('pop3s')}/1")
        assert r.returncode == 0, r.stderr
        assert r.stdout == MSG2
        g = h.grant("127.0.0.7")
        assert g is not None and g.user == "alice"
        # a client that does not trust the certificate gets nowhere
        r = await run(curl, "-sS", "--interface", "127.0.0.8", "-u", "alice:alice-pw",
                      f"pop3s://127.0.0.1:{h.port('pop3s')}/1")
        assert r.returncode != 0
        assert h.grant("127.0.0.8") is None
    finally:
        await h.stop()


def _fetchmailrc(tmp_path: Path, port: int, password: str, out: Path, extra: str = "") -> Path:
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 with proto POP3 service {port} auth password\n"
        f'    user "alice" there with password "{password}" is "root" here\n'
        f"    fetchall {extra}\n"
        f"    mda \"/bin/sh -c 'cat >> {out}'\"\n")
    rc.chmod(0o600)
    return rc


async def test_fetchmail_retrieves_and_deletes(pop: Pop3Harness, tmp_path: Path) -> None:
    fetchmail = need_program("fetchmail")
    p1 = deliver(maildir(pop), MSG1)
    p2 = deliver(maildir(pop), MSG2)
    out = tmp_path / "out.mbox"
    rc = _fetchmailrc(tmp_path, pop.port(), "alice-pw", out, extra='sslproto ""')
    env = {**os.environ, "HOME": str(tmp_path)}
    r = await run(fetchmail, "-f", str(rc), "-i", str(tmp_path / "ids"), "--pidfile",
                  str(tmp_path / "fm.pid"), "--nodetach", "-v", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    got = out.read_bytes()
    assert b"Subject: one" in got and b"\n.dotted\n" in got and b"body two" in got
    # fetchmail deleted both; the files went at QUIT (UPDATE state)
    assert not p1.exists() and not p2.exists()
    assert list((maildir(pop) / "new").iterdir()) == []
    assert list((maildir(pop) / "cur").iterdir()) == []
    g = pop.grant("127.0.0.1")  # fetchmail cannot choose its source address
    assert g is not None and (g.user, g.source) == ("alice", "pop3")


async def test_fetchmail_wrong_password(pop: Pop3Harness, tmp_path: Path) -> None:
    fetchmail = need_program("fetchmail")
    p1 = deliver(maildir(pop), MSG1)
    out = tmp_path / "out.mbox"
    rc = _fetchmailrc(tmp_path, pop.port(), "nope", out, extra='sslproto ""')
    env = {**os.environ, "HOME": str(tmp_path)}
    r = await run(fetchmail, "-f", str(rc), "-i", str(tmp_path / "ids"), "--pidfile",
                  str(tmp_path / "fm.pid"), "--nodetach", env=env)
    assert r.returncode == 3, r.stdout + r.stderr  # fetchmail: authentication failed
    assert not out.exists() and p1.exists()
    assert pop.store.list(0) == []


async def test_fetchmail_over_stls(tmp_path: Path) -> None:
    fetchmail = need_program("fetchmail")
    ca = trustme.CA()
    # fetchmail insists on a subject common name, besides the subjectAltName.
    cert = ca.issue_cert("127.0.0.1", "localhost", common_name="localhost")
    cert_path, key_path, ca_path = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    ca.cert_pem.write_to_path(ca_path)
    h = await start_pop3(tmp_path, tls=(cert_path, key_path))
    h.db.add("alice", "alice-pw")
    p1 = deliver(maildir(h), MSG1)
    out = tmp_path / "out.mbox"
    rc = _fetchmailrc(tmp_path, h.port(), "alice-pw", out,
                      extra=f"sslproto TLS1.2+ sslcertck sslcertfile {ca_path} "
                            "sslcommonname localhost")
    env = {**os.environ, "HOME": str(tmp_path)}
    try:
        r = await run(fetchmail, "-f", str(rc), "-i", str(tmp_path / "ids"), "--pidfile",
                      str(tmp_path / "fm.pid"), "--nodetach", "-v", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert b"POP3> STLS" in r.stdout + r.stderr
        assert b"Subject: one" in out.read_bytes()
        assert not p1.exists()
        g = h.grant("127.0.0.1")
        assert g is not None and g.user == "alice"
    finally:
        await h.stop()


def test_relaygate_pop3d_command(tmp_path: Path) -> None:
    """`relaygate pop3d` serves, opens windows in its store, reloads on SIGHUP, stops on TERM."""
    data = tmp_path / "data"
    db = UserDB(data / "users.db", AuthSettings(), data, hasher=CHEAP,
                default_domain="example.test")
    db.add("alice", "alice-pw")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaygate", "--data-dir", str(data), "pop3d", "--listen",
         f"127.0.0.1:{port}", "--hostname", "pop.example.test"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port)
        db.add("late", "late-pw")  # seen without a restart
        proc.send_signal(signal.SIGHUP)
        for user, pw, src in (("alice", "alice-pw", "127.0.0.2"), ("late", "late-pw",
                                                                   "127.0.0.3")):
            c = POP3From("127.0.0.1", port, src)
            assert c.getwelcome().endswith(b"@pop.example.test>")
            c.user(user)
            assert c.pass_(pw).startswith(b"+OK")
            c.quit()
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            s.recv(200)  # an idle session: cut at shutdown
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        db.close()
    # the windows went to the default store: SQLite in the data directory
    r = subprocess.run([sys.executable, "-m", "relaygate", "--data-dir", str(data), "check",
                        "127.0.0.3"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"late" in r.stdout
    # the login rehashed alice's cheap hash to the production parameters
    db = UserDB(data / "users.db", AuthSettings(), data)
    row = db._query(lambda c: c.execute("SELECT password FROM users WHERE login='alice'")
                    .fetchone())
    assert row[0].startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    db.close()
