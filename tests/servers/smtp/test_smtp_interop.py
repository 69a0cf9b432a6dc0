"""Real clients and real programs: swaks, nmap smtp-open-relay, ``smtpd --stdio`` under
tcpserver, the ``relaygate smtpd`` command, and the real queue."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_smtp_support import (
    LOCAL,
    PASSWORDS,
    RULE_IP,
    STRANGER_IP,
    WINDOW_IP,
    RawClient,
    SmtpHarness,
)

from conftest import free_port, need_program, wait_port
from relaygate.config import Settings

MSG = b"Subject: interop\r\n\r\nhello\r\n"
RELAYGATE = [sys.executable, "-m", "relaygate"]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[SmtpHarness]:
    harness = SmtpHarness(tmp_path)
    yield harness
    harness.stop()


# -- swaks ---------------------------------------------------------------------------


def swaks(h: SmtpHarness, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = need_program("swaks")
    return subprocess.run(
        [exe, "--server", "127.0.0.1", "--port", str(h.port()), "--local-interface", source,
         "--helo", "swaks.example", "--timeout", "10", *args],
        capture_output=True, text=True, timeout=60)


def test_swaks_scenarios(h: SmtpHarness) -> None:
    # a stranger can write to a local mailbox...
    p = swaks(h, STRANGER_IP, "--from", "x@far.example", "--to", f"bob@{LOCAL}")
    assert p.returncode == 0, p.stdout
    assert len(h.maildir_messages("bob")) == 1
    # ...but not relay (swaks exits 24: RCPT refused)
    p = swaks(h, STRANGER_IP, "--from", "x@far.example", "--to", "y@remote.invalid")
    assert p.returncode == 24, p.stdout
    assert "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts" in p.stdout
    # a client with an open POP window relays
    h.open_window(WINDOW_IP, user="alice")
    p = swaks(h, WINDOW_IP, "--from", f"alice@{LOCAL}", "--to", "y@remote.invalid")
    assert p.returncode == 0, p.stdout
    # and SMTP AUTH works from anywhere (loopback listener: plaintext allowed)
    p = swaks(h, STRANGER_IP, "--from", f"bob@{LOCAL}", "--to", "z@remote.invalid",
              "--auth", "LOGIN", "--auth-user", "bob", "--auth-password", PASSWORDS["bob"])
    assert p.returncode == 0, p.stdout
    assert h.queue is not None
    assert [item[1] for item in h.queue.items] == [["y@remote.invalid"], ["z@remote.invalid"]]


# -- nmap smtp-open-relay --------------------------------------------------------------------


def nmap_open_relay(h: SmtpHarness, source: str) -> str:
    exe = need_program("nmap")
    p = subprocess.run(
        [exe, "-Pn", "-n", "-p", str(h.port()), "--script", "+smtp-open-relay",
         "--script-args", "smtp-open-relay.domain=remote.invalid",
         "-S", source, "-e", "lo", "-vv", "127.0.0.1"],
        capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_nmap_reports_closed_relay(h: SmtpHarness) -> None:
    out = nmap_open_relay(h, STRANGER_IP)
    assert "smtp-open-relay: Server doesn't seem to be an open relay, all tests failed" in out, out
    assert h.queue is not None and h.queue.items == []


def test_nmap_sees_the_relay_a_window_opens(h: SmtpHarness) -> None:
    """The same probe from an address with an open window: the script can tell."""
    h.open_window(WINDOW_IP)
    out = nmap_open_relay(h, WINDOW_IP)
    assert "Server is an open relay" in out, out


# -- the real queue -------------------------------------------------------------------------


def test_relayed_mail_lands_in_the_real_queue(tmp_path: Path) -> None:
    from relaygate.mail.queue import Queue

    h = SmtpHarness(tmp_path)
    try:
        queue = Queue(tmp_path / "realqueue")
        h.ctx.queue = queue
        c = h.client(RULE_IP)
        c.sendmail("a@sender.example", ["x@remote.invalid", "y@remote.invalid"], MSG)
        c.quit()
        (qid,) = queue.ids()
        env = queue.load(qid)
        assert env.sender == "a@sender.example"
        assert [r.addr for r in env.recipients] == ["x@remote.invalid", "y@remote.invalid"]
        data = queue.read_message(qid)
        assert data.startswith(b"Received: from client.example ([127.0.0.4])")
        assert data.endswith(MSG)
    finally:
        h.stop()


# -- relaygate smtpd --stdio -------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    from relaygate.mail.accounts.db import open_directory

    d = tmp_path / "data"
    d.mkdir()
    users = open_directory(Settings(data_dir=d, domains=(LOCAL,), hostname="mx.example.org"))
    users.add("alice", PASSWORDS["alice"], domain=LOCAL, addresses=[f"alice@{LOCAL}"])
    users.close()
    return d


def stdio(data_dir: Path, script: bytes, env: dict[str, str], *extra: str) -> str:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RELAYCLIENT", "TCPREMOTEIP", "TCPLOCALIP", "USER", "DOMAIN")}
    full_env.update(env)
    p = subprocess.run(
        [*RELAYGATE, "--data-dir", str(data_dir), "smtpd", "--stdio", "--domain", LOCAL,
         "--hostname", "mx.example.org", *extra],
        input=script, capture_output=True, env=full_env, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


SESSION = (b"EHLO client.example\r\nMAIL FROM:<a@sender.example>\r\n"
           b"RCPT TO:<x@remote.invalid>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
           b"Subject: stdio\r\n\r\nhello\r\n.\r\nQUIT\r\n")


def test_stdio_without_relayclient_only_local(data_dir: Path) -> None:
    out = stdio(data_dir, SESSION, {"TCPREMOTEIP": "192.0.2.7"})
    assert out.startswith("220 mx.example.org ESMTP relaygate\r\n")
    assert "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts" in out
    assert "250 2.0.0 OK" in out and out.rstrip().endswith("221 Bye")
    (msg,) = list((data_dir / "mail" / LOCAL / "alice" / "new").iterdir())
    assert b"from client.example ([192.0.2.7])" in msg.read_bytes()
    assert not list((data_dir / "queue" / "env").iterdir())


def test_stdio_relayclient_relays_with_fixup(data_dir: Path) -> None:
    from relaygate.mail.queue import Queue

    out = stdio(data_dir, SESSION, {"TCPREMOTEIP": "2001:db8::7", "RELAYCLIENT": "@fixup.example",
                                    "USER": "alice"})
    assert "553" not in out and "250 2.0.0 OK" in out
    queue = Queue(data_dir / "queue")
    (qid,) = queue.ids()
    assert [r.addr for r in queue.load(qid).recipients] == ["x@remote.invalid@fixup.example"]
    data = queue.read_message(qid)
    assert b"from client.example ([IPv6:2001:db8::7])" in data
    assert b"(relay allowed: RELAYCLIENT of alice)" in data


def test_stdio_use_store_asks_the_grant_store(data_dir: Path) -> None:
    store = f"sqlite://{data_dir / 'grants.db'}"
    subprocess.run([*RELAYGATE, "--data-dir", str(data_dir), "--store", store, "allow",
                    "192.0.2.8", "--user", "alice"], check=True, capture_output=True, timeout=60)
    script = (b"EHLO c\r\nMAIL FROM:<a@sender.example>\r\nRCPT TO:<x@remote.invalid>\r\n"
              b"QUIT\r\n")
    out = stdio(data_dir, script, {"TCPREMOTEIP": "192.0.2.8"}, "--use-store")
    assert "250 2.1.5" in out
    out = stdio(data_dir, script, {"TCPREMOTEIP": "192.0.2.9"}, "--use-store")
    assert "553 5.7.1" in out
    # without --use-store, only $RELAYCLIENT counts
    out = stdio(data_dir, script, {"TCPREMOTEIP": "192.0.2.8"})
    assert "553 5.7.1" in out


def test_stdio_under_tcpserver(data_dir: Path, tmp_path: Path) -> None:
    tcpserver = need_program("tcpserver")
    tcprules = need_program("tcprules")
    rules = tmp_path / "rules.txt"
    rules.write_text(f'{RULE_IP}:allow,RELAYCLIENT=""\n:allow\n')
    cdb = tmp_path / "rules.cdb"
    with open(rules, "rb") as f:
        subprocess.run([tcprules, str(cdb), str(tmp_path / "rules.tmp")], stdin=f, check=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RELAYCLIENT", "USER")}
    proc = subprocess.Popen(
        [tcpserver, "-R", "-H", "-l", "0", "-x", str(cdb), "127.0.0.1", str(port),
         *RELAYGATE, "--data-dir", str(data_dir), "smtpd", "--stdio", "--domain", LOCAL],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        for source, relays in ((RULE_IP, True), (STRANGER_IP, False)):
            r = RawClient("127.0.0.1", port, source, timeout=30)
            assert r.greeting.startswith("220")
            r.cmd("EHLO client.example")
            r.cmd("MAIL FROM:<a@sender.example>")
            reply = r.cmd("RCPT TO:<x@remote.invalid>")
            assert reply.startswith("250" if relays else "553 5.7.1"), (source, reply)
            assert r.cmd(f"RCPT TO:<alice@{LOCAL}>").startswith("250")
            assert r.cmd("QUIT").startswith("221")
            assert r.closed()
    finally:
        proc.terminate()
        proc.wait(10)


# -- relaygate smtpd (listeners) -----------------------------------------------------------------


def test_smtpd_command_runs_and_stops(data_dir: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*RELAYGATE, "--data-dir", str(data_dir), "smtpd", "--listen", f"127.0.0.1:{port}",
         "--submission", "off", "--domain", LOCAL, "--hostname", "mx.example.org"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port, timeout=30)
        c = smtplib.SMTP("127.0.0.1", port, source_address=(STRANGER_IP, 0), timeout=10)
        c.ehlo("client.example")
        c.login("alice", PASSWORDS["alice"])
        assert c.sendmail(f"alice@{LOCAL}", ["x@remote.invalid", f"alice@{LOCAL}"], MSG) == {}
        c.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"smtp 127.0.0.1:{port}".encode() in out
    assert b"message.accepted" in err
    assert len(list((data_dir / "mail" / LOCAL / "alice" / "new").iterdir())) == 1


def test_smtpd_command_reloads_on_sighup(data_dir: Path) -> None:
    """smtpd runs through the runtime every service command shares: SIGHUP re-reads
    (rcpthosts, users, rules) instead of killing the process, as it did."""
    port = free_port()
    rcpthosts = data_dir / "rcpthosts"
    rcpthosts.write_text(f"{LOCAL}\n")
    proc = subprocess.Popen(
        [*RELAYGATE, "--data-dir", str(data_dir), "smtpd", "--listen", f"127.0.0.1:{port}",
         "--submission", "off", "--rcpthosts", str(rcpthosts)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port, timeout=30)
        rcpthosts.write_text(f"{LOCAL}\nother.example\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None, "SIGHUP ended smtpd"
        c = smtplib.SMTP("127.0.0.1", port, source_address=(STRANGER_IP, 0), timeout=10)
        c.ehlo("client.example")
        # other.example is local now: a stranger gets "no mailbox", not "no relaying"
        assert c.mail("a@b.example")[0] == 250
        assert c.rcpt("nobody@other.example")[0] == 550
        c.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"smtpd.reloaded" in err
