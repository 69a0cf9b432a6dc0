"""Hostile or broken clients do not fill the error log (issue 13, item 4).

Against one ``relaygate serve`` with TLS, on SMTP, POP3 and IMAP: STARTTLS/STLS
followed by garbage, by a close, by a reset or by half a ClientHello; the same
on the implicit-TLS listeners; binary garbage, overlong lines and resets in
plaintext sessions. Each is the client's doing: at most an info line, no
traceback, nothing in ``relaygate status``'s "last errors" (warnings and
errors of the serve process, kept in status.json).
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_harness import Serve, free_port

STARTTLS = {"smtp": [b"EHLO x\r\n", b"STARTTLS\r\n"], "pop3": [b"STLS\r\n"],
            "imap": [b"a STARTTLS\r\n"]}
GARBAGE = b"\x16\x03\x01garbage" * 10


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Serve, dict[str, int], ssl.SSLContext]]:
    import trustme

    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    tls = {name: free_port() for name in ("smtps", "pop3s", "imaps")}
    s = Serve(tmp_path / "serve", extra=(
        "--tls-cert", str(pem), "--tls-key", str(pem),
        *(a for name, port in tls.items() for a in (f"--{name}", f"127.0.0.1:{port}"))))
    s.start()
    yield s, tls, client
    s.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def drain(c: socket.socket) -> None:
    c.settimeout(0.3)
    try:
        c.recv(65536)
    except OSError:
        pass
    c.settimeout(5)


def reset(c: socket.socket) -> None:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def end(c: socket.socket, how: str) -> None:
    if how == "garbage":
        c.sendall(GARBAGE)
        drain(c)
        c.close()
    elif how == "close":
        c.close()
    elif how == "reset":
        reset(c)
    elif how == "half hello":
        c.sendall(b"\x16\x03\x01\x00\x50")
        c.shutdown(socket.SHUT_WR)
        drain(c)
        c.close()


def test_hostile_clients_leave_no_errors(
        serve: tuple[Serve, dict[str, int], ssl.SSLContext]) -> None:
    s, tls, client = serve
    for service, commands in STARTTLS.items():
        for how in ("garbage", "close", "reset", "half hello"):
            c = connect(s.ports[service])
            drain(c)
            for line in commands:
                c.sendall(line)
                drain(c)
            end(c, how)
    for service in tls:
        for how in ("garbage", "close", "reset", "half hello"):
            end(connect(tls[service]), how)
        # a complete handshake, then a reset
        t = client.wrap_socket(connect(tls[service]), server_hostname="127.0.0.1")
        t.recv(100)
        reset(t)
    for service in STARTTLS:
        for payload in (bytes(range(256)) * 20, b"\xff\xfe\x00\r\n" * 30,
                        b"A" * 100_000 + b"\r\n"):
            c = connect(s.ports[service])
            drain(c)
            c.sendall(payload)
            drain(c)
            reset(c)
    time.sleep(1.0)  # let the server see the last resets
    assert s.stop() == 0
    log = s.log()
    assert "Traceback" not in log, log
    assert "error:" not in log, log
    doc = json.loads((s.data_dir / "status.json").read_text())
    errors = [e for e in doc["errors"]
              if not e["msg"].startswith("running as root")]
    assert errors == [], errors
    # the failures were seen (as info lines)
    assert "TLS handshake failed with 127.0.0.1" in log
