"""Real IMAP clients against relaygate's IMAP server: curl, fetchmail, mbsync.

curl binds 127.0.0.2 with --interface; fetchmail and mbsync cannot choose a
source address, so they connect to ::1 (the source is then ::1) or, without
IPv6, to 127.0.0.1. After each login the grant store must hold a window for
exactly that address and user, and the messages must arrive byte for byte.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_imap import CRLF_MESSAGE, LF_MESSAGE, PASSWORD, Harness

from conftest import have_ipv6_loopback, need_program
from relaygate.mail.maildir import deliver
from relaygate.servers.imap.backend import to_crlf


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, ipv6=have_ipv6_loopback()).start()
    deliver(h.alice.maildir, LF_MESSAGE)
    deliver(h.alice.maildir, CRLF_MESSAGE)
    yield h
    h.stop()
    h.assert_clean()


def _client_host(h: Harness) -> tuple[str, int]:
    """Where fetchmail/mbsync connect: ::1 when available (source ::1), else 127.0.0.1."""
    if len(h.ports) > 1:
        return "::1", h.ports[1]
    return "127.0.0.1", h.port


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=60, check=False, **kw)  # type: ignore[call-overload, no-any-return]


# -- curl ----------------------------------------------------------------------------


def test_curl_fetches_exact_bytes_from_127_0_0_2(served: Harness) -> None:
    curl = need_program("curl")
    url = f"imap://127.0.0.1:{served.port}/INBOX;UID="
    for uid, raw in ((1, LF_MESSAGE), (2, CRLF_MESSAGE)):
        p = _run([curl, "-sS", "--interface", "127.0.0.2", "--user", f"alice:{PASSWORD}",
                  f"{url}{uid}"])
        assert p.returncode == 0, p.stderr
        assert p.stdout == to_crlf(raw)
    g = served.grant("127.0.0.2")
    assert g is not None and g.user == "alice" and g.source == "imap"
    assert served.grant("127.0.0.1") is None


def test_curl_from_ipv6_and_wrong_password(served: Harness) -> None:
    curl = need_program("curl")
    p = _run([curl, "-sS", "--interface", "127.0.0.3", "--user", "alice:wrong",
              f"imap://127.0.0.1:{served.port}/"])
    assert p.returncode == 67  # CURLE_LOGIN_DENIED
    assert served.grant("127.0.0.3") is None
    if len(served.ports) < 2:
        pytest.skip("no IPv6 loopback")
    p = _run([curl, "-sS", "--user", f"alice:{PASSWORD}", f"imap://[::1]:{served.ports[1]}/"])
    assert p.returncode == 0, p.stderr
    assert b'"/" INBOX' in p.stdout
    g = served.grant("::1")
    assert g is not None and g.user == "alice"


# -- fetchmail -----------------------------------------------------------------------


def _fetchmail(h: Harness, password: str, tmp: Path) -> subprocess.CompletedProcess[bytes]:
    exe = need_program("fetchmail")
    host, port = _client_host(h)
    out = tmp / "delivered"
    rc = tmp / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f'poll "{host}" service {port} protocol IMAP\n'
        f'  user "alice" password "{password}" is "nobody" here\n'
        "  sslproto ''\n"  # no TLS on this listener: do not even try STARTTLS
        "  keep fetchall\n"
        f"  mda \"/bin/sh -c 'cat >> {out}; echo ==END== >> {out}'\"\n")
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp), "FETCHMAILHOME": str(tmp)}
    return _run([exe, "-f", str(rc), "--nodetach", "--nosyslog", "-v"], env=env)


def test_fetchmail_imap(served: Harness, tmp_path: Path) -> None:
    host, _ = _client_host(served)
    work = tmp_path / "fm"
    work.mkdir()
    bad = _fetchmail(served, "wrong", work)
    assert bad.returncode == 3, bad.stderr  # PS_AUTHFAIL
    assert served.grant(host) is None
    p = _fetchmail(served, PASSWORD, work)
    assert p.returncode == 0, p.stderr + p.stdout
    g = served.grant(host)
    assert g is not None and g.user == "alice"
    delivered = (work / "delivered").read_bytes().split(b"==END==\n")
    assert len(delivered) == 3 and delivered[2] == b""
    # fetchmail adds its Received: line and hands the MDA LF line ends
    assert delivered[0].endswith(LF_MESSAGE)
    assert delivered[1].endswith(CRLF_MESSAGE.replace(b"\r\n", b"\n"))


# -- mbsync (isync) ------------------------------------------------------------------


def _mbsync_config(h: Harness, local: Path, password: str) -> Path:
    host, port = _client_host(h)
    cfg = local.parent / "mbsyncrc"
    cfg.write_text(
        "IMAPAccount acc\n"
        f'Host {host}\nPort {port}\nUser alice\nPass "{password}"\n'
        "SSLType None\nAuthMechs LOGIN\n\n"
        "IMAPStore remote\nAccount acc\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel ch\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\nSyncState *\n")
    return cfg


def test_mbsync_both_ways(served: Harness, tmp_path: Path) -> None:
    exe = need_program("mbsync")
    host, _ = _client_host(served)
    local = tmp_path / "local"
    local.mkdir()
    bad = _run([exe, "-c", str(_mbsync_config(served, local, "wrong")), "-a"])
    assert bad.returncode != 0
    assert b"AUTHENTICATIONFAILED" in bad.stderr, bad.stderr
    assert served.grant(host) is None
    cfg = _mbsync_config(served, local, PASSWORD)
    p = _run([exe, "-c", str(cfg), "-a"])
    assert p.returncode == 0, p.stderr
    g = served.grant(host)
    assert g is not None and g.user == "alice"
    inbox = local / "INBOX"
    files = [*(inbox / "cur").iterdir(), *(inbox / "new").iterdir()]
    # mbsync adds its X-TUID: header and stores LF line ends
    got = sorted(re.sub(rb"(?m)^X-TUID: .*\n", b"", f.read_bytes()) for f in files)
    assert got == sorted([LF_MESSAGE, CRLF_MESSAGE.replace(b"\r\n", b"\n")])
    # a message filed locally into a new folder is uploaded (CREATE + APPEND)
    sent = local / "Sent"
    for sub in ("cur", "new", "tmp"):
        (sent / sub).mkdir(parents=True)
    mine = b"From: alice@example.test\nSubject: from mbsync\n\nuploaded\n"
    (sent / "cur" / "1700000000.1_1.client:2,S").write_bytes(mine)
    p = _run([exe, "-c", str(cfg), "-a"])
    assert p.returncode == 0, p.stderr
    server_sent = served.alice.maildir / ".Sent"
    files = [*(server_sent / "cur").iterdir(), *(server_sent / "new").iterdir()]
    uploaded = [re.sub(rb"(?m)^X-TUID: .*\r\n", b"", f.read_bytes()) for f in files]
    assert uploaded == [mine.replace(b"\n", b"\r\n")]  # APPEND stored the literal as sent


# -- the command ---------------------------------------------------------------------


def test_imapd_command_end_to_end(tmp_path: Path) -> None:
    """`relaygate imapd` with a real users.db and the SQLite store; SIGTERM exits 0."""
    import signal
    import sys
    import time

    from argon2 import PasswordHasher

    from conftest import free_port, wait_port
    from relaygate.config import AuthSettings
    from relaygate.mail.accounts.db import UserDB
    from relaygate.stores.sqlite import SqliteStore

    data = tmp_path / "data"
    db = UserDB(data / "users.db", AuthSettings(), data,
                hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    db.add("dora@example.test", PASSWORD)
    db.close()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaygate", "--data-dir", str(data), "imapd",
         "--listen", f"127.0.0.1:{port}", "--hostname", "imap.example.test"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port)
        import imaplib

        c = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        assert b"imap.example.test" in c.welcome
        assert c.login("dora@example.test", PASSWORD)[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
        c.logout()
        store = SqliteStore(data / "grants.db")
        g = store.get("127.0.0.1", time.time())
        store.close()
        assert g is not None and g.user == "dora@example.test" and g.source == "imap"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"login.ok service=imap user=dora@example.test ip=127.0.0.1" in err
