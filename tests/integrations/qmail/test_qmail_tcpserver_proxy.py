"""``relaygate tcpserver --trusted-proxy``: the PROXY header names TCPREMOTEIP, rules and the
relay decision look at the client, the program reads the client's bytes intact."""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path

from relaygate.protocols.proxy import build_v1, build_v2

from .helpers import BIN, Server, run, start_relaygate_tcpserver, talk

PROXY = "127.0.0.9"
CLIENT = "192.0.2.7"

#: prints what the program was given, then echoes the first line the client sent
PROGRAM = ["sh", "-c", 'echo "$TCPREMOTEIP $TCPREMOTEPORT ${RELAYCLIENT-none}"; head -n 1']


def allow(spool: Path, ip: str) -> None:
    r = run([str(BIN / "relaygate"), "--store", f"spool://{spool}", "allow", ip], {})
    assert r.returncode == 0, r.stderr


def _start(tmp_path: Path, spool: Path, servers: list[Server], *extra: str) -> Server:
    server, _ = start_relaygate_tcpserver(
        ["--trusted-proxy", PROXY, *extra], PROGRAM, {"RELAY_CTRL_DIR": str(spool)},
        tmp_path / "log", host="127.0.0.1")
    servers.append(server)
    return server


def test_header_names_the_client_and_its_window(tmp_path: Path, spool: Path,
                                                servers: list[Server]) -> None:
    server = _start(tmp_path, spool, servers)
    out = talk(server.port, source=PROXY,
               send=build_v1((CLIENT, 4000), ("127.0.0.1", 25)) + b"HELLO\n")
    assert out == f"{CLIENT} 4000 none\nHELLO\n".encode()
    # a window for the client (relay-ctrl spool) makes it relay; none for the proxy
    allow(spool, CLIENT)
    out = talk(server.port, source=PROXY,
               send=build_v2(("2001:db8::7", 5), ("::1", 25)) + b"x\n")
    assert out == b"2001:db8::7 5 none\nx\n"
    out = talk(server.port, source=PROXY,
               send=build_v2((CLIENT, 4001), ("127.0.0.1", 25)) + b"y\n")
    assert out == f"{CLIENT} 4001 \ny\n".encode()  # RELAYCLIENT="" (plain relay)


def test_untrusted_header_is_the_programs_input(tmp_path: Path, spool: Path,
                                                servers: list[Server]) -> None:
    server = _start(tmp_path, spool, servers)
    allow(spool, CLIENT)
    header = build_v1((CLIENT, 4000), ("127.0.0.1", 25))
    out = talk(server.port, source="127.0.0.21", send=header)
    assert out == b"127.0.0.21 " + out.split(b" ")[1] + b" none\n" + header


def test_proxy_without_header_is_dropped(tmp_path: Path, spool: Path,
                                         servers: list[Server]) -> None:
    cfg = tmp_path / "relaygate.toml"
    cfg.write_text("proxy_timeout = 0.5\n")
    server, _ = start_relaygate_tcpserver(
        ["--trusted-proxy", PROXY], PROGRAM,
        {"RELAY_CTRL_DIR": str(spool), "RELAYGATE_CONFIG": str(cfg)}, tmp_path / "log",
        host="127.0.0.1")
    servers.append(server)
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((PROXY, 0))
        s.connect(("127.0.0.1", server.port))
        started = time.monotonic()
        assert s.recv(100) == b""  # dropped, the program never ran
        assert time.monotonic() - started >= 0.4
    try:  # closed at once (a reset, with the client's bytes unread)
        assert talk(server.port, source=PROXY, send=b"EHLO x\r\n") == b""
    except OSError as exc:
        # the reset may come before the client's own shutdown(): ENOTCONN there
        assert exc.errno in (errno.ECONNRESET, errno.ENOTCONN), exc
    # the header and the client are still served meanwhile (nothing blocks the loop)
    assert talk(server.port, source=PROXY, send=build_v2(None, None, local=True) + b"z\n") \
        .startswith(f"{PROXY} ".encode())
    log = server.stop()
    assert f"tcpserver: warning: dropping connection from proxy {PROXY}: no PROXY header " \
           "within 0.5s" in log
    assert "no PROXY protocol signature" in log


def test_a_slow_proxy_does_not_hold_up_others(tmp_path: Path, spool: Path,
                                              servers: list[Server]) -> None:
    server = _start(tmp_path, spool, servers, "-c", "5")
    slow = socket.socket()
    slow.settimeout(10)
    slow.bind((PROXY, 0))
    slow.connect(("127.0.0.1", server.port))
    try:
        slow.sendall(b"PROXY TCP4 192.0.2.8 ")  # half a header, then silence
        assert talk(server.port, source="127.0.0.21", send=b"q\n").endswith(b" none\nq\n")
        slow.sendall(b"127.0.0.1 6000 25\r\nlate\n")
        slow.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := slow.recv(100):
            data += chunk
        assert data == b"192.0.2.8 6000 none\nlate\n"
    finally:
        slow.close()
