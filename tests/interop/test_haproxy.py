"""Real HAProxy (TCP mode, ``send-proxy`` and ``send-proxy-v2``) in front of ``relaygate serve``.

HAProxy listens on 127.0.0.9 and connects to relaygate from 127.0.0.9 (``source``),
the one address given to ``--trusted-proxy``; clients connect from 127.0.0.21 and
127.0.0.22. Checked: a POP3/IMAP login through the proxy opens a window for the
client, none for the proxy; SMTP through the proxy relays for that client only, and
its Received line names it; a PROXY header sent directly by an untrusted address is
answered as a bad command and not believed; the proxy's address without a header gets
nothing; implicit TLS (POP3S, IMAPS, smtps) works through the proxy, the header going
before the handshake; HAProxy's v2 health checks (LOCAL) are served and open nothing.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from haproxy_harness import PROXY_ADDRESS, HAProxy, Route
from serve_harness import LineClient, Serve, Sink, free_port, imap_login, pop3_login, smtp

from conftest import need_program

CLIENT = "127.0.0.21"
STRANGER = "127.0.0.22"
PASSWORD = "correct horse battery staple"
#: short, so the "proxy without a header" case does not slow the suite down
PROXY_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, trustme.CA]:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.9", "127.0.0.1")
    cert_file, key_file = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file, ca


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, sink: Sink,
          tls_files: tuple[Path, Path, trustme.CA]) -> Iterator[Serve]:
    cert, key, _ = tls_files
    tls_ports = {name: free_port() for name in ("smtps", "pop3s", "imaps")}
    extra = ["--trusted-proxy", PROXY_ADDRESS, "--tls-cert", str(cert), "--tls-key", str(key)]
    for name, port in tls_ports.items():
        extra += [f"--{name}", f"127.0.0.1:{port}"]
    s = Serve(tmp_path_factory.mktemp("serve"), expiry=300,
              smtproutes=f"example.net:127.0.0.1:{sink.port}\n", extra=tuple(extra))
    s.ports.update(tls_ports)
    config = s.workdir / "relaygate.toml"
    config.write_text(f"proxy_timeout = {PROXY_TIMEOUT}\n")
    s.extra = (*s.extra, "--config", str(config))
    s.add_user("alice", PASSWORD)
    s.start()
    yield s
    rc = s.stop()
    assert rc == 0, s.log()


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory, serve: Serve) -> Iterator[HAProxy]:
    program = need_program("haproxy", "/usr/sbin/haproxy")
    routes = []
    for version, send in (("v1", "send-proxy"), ("v2", "send-proxy-v2")):
        for name in ("smtp", "pop3", "imap", "smtps", "pop3s", "imaps"):
            routes.append(Route(f"{name}_{version}", serve.ports[name], send,
                                check=(version == "v2" and name == "smtp")))
    h = HAProxy(tmp_path_factory.mktemp("haproxy"), routes)
    h.start(program)
    yield h
    h.stop()


@pytest.fixture(autouse=True)
def no_windows(serve: Serve) -> Iterator[None]:
    yield
    for ip in (CLIENT, STRANGER, PROXY_ADDRESS):
        serve.relaygate("revoke", ip)


def window(serve: Serve, ip: str) -> bool:
    r = serve.relaygate("check", ip)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


def relay(source: str, port: int, marker: str, host: str = PROXY_ADDRESS) -> int:
    with smtp(source, host, port) as c:
        c.mail("alice@example.org")
        code, _ = c.rcpt("bob@example.net")
        if code == 250:
            code, _ = c.data(f"Subject: {marker}\r\n\r\n{marker}\r\n")
        return int(code)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("service", ["pop3", "imap"])
def test_login_through_the_proxy_opens_the_clients_window_only(
        serve: Serve, haproxy: HAProxy, service: str, version: str) -> None:
    login = pop3_login if service == "pop3" else imap_login
    assert not window(serve, CLIENT)
    assert login(CLIENT, PROXY_ADDRESS, haproxy.ports[f"{service}_{version}"], "alice",
                 PASSWORD)
    assert window(serve, CLIENT)
    assert not window(serve, PROXY_ADDRESS)
    assert not window(serve, STRANGER)
    listed = serve.relaygate("list").stdout
    assert CLIENT in listed and PROXY_ADDRESS not in listed


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_smtp_through_the_proxy_relays_for_the_client_only(
        serve: Serve, haproxy: HAProxy, sink: Sink, version: str) -> None:
    port = haproxy.ports[f"smtp_{version}"]
    marker = f"m-{uuid.uuid4().hex}"
    assert relay(CLIENT, port, marker) == 553  # no window yet
    assert pop3_login(CLIENT, PROXY_ADDRESS, haproxy.ports[f"pop3_{version}"], "alice",
                      PASSWORD)
    assert relay(CLIENT, port, marker) == 250
    assert relay(STRANGER, port, marker + "-stranger") == 553
    _, _, data = sink.wait_for(marker)
    # the trace line names the client, not the proxy
    assert f"([{CLIENT}])".encode() in data and PROXY_ADDRESS.encode() not in data
    assert f"ip={CLIENT}" in serve.log()


def test_a_direct_proxy_header_is_not_believed(serve: Serve, haproxy: HAProxy) -> None:
    # the client has a window; a stranger claims to be it
    assert pop3_login(CLIENT, PROXY_ADDRESS, haproxy.ports["pop3_v2"], "alice", PASSWORD)
    c = LineClient(STRANGER, "127.0.0.1", serve.ports["smtp"])
    try:
        assert c.line().startswith(b"220")
        c.send(f"PROXY TCP4 {CLIENT} 127.0.0.1 4000 25")
        assert c.line().startswith(b"500")
        c.send("EHLO stranger.test")
        while not c.line().startswith(b"250 "):
            pass
        c.send("MAIL FROM:<alice@example.org>")
        assert c.line().startswith(b"250")
        c.send("RCPT TO:<bob@example.net>")
        assert c.line().startswith(b"553")
    finally:
        c.close()
    # POP3: the header is a bad command, and the login opens the sender's own window
    serve.relaygate("revoke", CLIENT)
    c = LineClient(STRANGER, "127.0.0.1", serve.ports["pop3"])
    try:
        assert c.line().startswith(b"+OK")
        c.send(f"PROXY TCP4 {CLIENT} 127.0.0.1 4000 110")
        assert c.line().startswith(b"-ERR")
        c.send("USER alice@example.org")
        assert c.line().startswith(b"+OK")
        c.send(f"PASS {PASSWORD}")
        assert c.line().startswith(b"+OK")
        c.send("QUIT")
        c.line()
    finally:
        c.close()
    assert window(serve, STRANGER)
    assert not window(serve, CLIENT)


def test_the_proxy_without_a_header_gets_nothing(serve: Serve, haproxy: HAProxy) -> None:
    # straight from the proxy's address, silent: closed after proxy_timeout, no greeting
    for service in ("smtp", "pop3", "imap"):
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind((PROXY_ADDRESS, 0))
        sock.connect(("127.0.0.1", serve.ports[service]))
        started = time.monotonic()
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
        finally:
            sock.close()
        assert time.monotonic() - started >= PROXY_TIMEOUT * 0.9
    # talking SMTP at once: closed at once, nothing relayed
    c = LineClient(PROXY_ADDRESS, "127.0.0.1", serve.ports["smtp"])
    try:
        c.send("EHLO proxy.test")
        with pytest.raises((ConnectionError, OSError)):
            c.line()
    finally:
        c.close()
    assert "proxy.refused" in serve.log() and "no PROXY protocol signature" in serve.log()
    assert not window(serve, PROXY_ADDRESS)


def _tls_client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_implicit_tls_through_the_proxy(serve: Serve, haproxy: HAProxy, sink: Sink,
                                        tls_files: tuple[Path, Path, trustme.CA],
                                        version: str) -> None:
    ctx = _tls_client(tls_files[2])
    # POP3S login from the client through the proxy
    raw = socket.socket()
    raw.settimeout(30)
    raw.bind((CLIENT, 0))
    raw.connect((PROXY_ADDRESS, haproxy.ports[f"pop3s_{version}"]))
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        f = tls.makefile("rb")
        assert f.readline().startswith(b"+OK")
        for cmd in ("USER alice@example.org", f"PASS {PASSWORD}", "QUIT"):
            tls.sendall(cmd.encode() + b"\r\n")
            assert f.readline().startswith(b"+OK")
    assert window(serve, CLIENT) and not window(serve, PROXY_ADDRESS)
    serve.relaygate("revoke", CLIENT)
    # IMAPS
    raw = socket.socket()
    raw.settimeout(30)
    raw.bind((CLIENT, 0))
    raw.connect((PROXY_ADDRESS, haproxy.ports[f"imaps_{version}"]))
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        f = tls.makefile("rb")
        assert f.readline().startswith(b"* OK")
        tls.sendall(f'a1 LOGIN "alice@example.org" "{PASSWORD}"\r\n'.encode())
        while not (line := f.readline()).startswith(b"a1 "):
            pass
        assert line.startswith(b"a1 OK")
        tls.sendall(b"a2 LOGOUT\r\n")
    assert window(serve, CLIENT) and not window(serve, PROXY_ADDRESS)
    # smtps relays for the client, and its Received line says so
    import smtplib

    marker = f"m-{uuid.uuid4().hex}"
    with smtplib.SMTP_SSL(PROXY_ADDRESS, haproxy.ports[f"smtps_{version}"], timeout=30,
                          local_hostname="client.test", source_address=(CLIENT, 0),
                          context=ctx) as c:
        c.ehlo()
        c.mail("alice@example.org")
        assert c.rcpt("bob@example.net")[0] == 250
        assert c.data(f"Subject: {marker}\r\n\r\n{marker}\r\n")[0] == 250
    _, _, data = sink.wait_for(marker)
    assert f"([{CLIENT}])".encode() in data


def test_health_checks_are_served_and_open_nothing(serve: Serve, haproxy: HAProxy) -> None:
    # the v2 smtp route checks every second with a LOCAL header; let a few run
    before = len(serve.log())
    time.sleep(3)
    assert "DOWN" not in haproxy.output(), haproxy.output()
    assert "proxy.refused" not in serve.log()[before:]
    assert not window(serve, PROXY_ADDRESS)


def test_haproxy_config_in_deploy_is_valid(tmp_path: Path) -> None:
    program = need_program("haproxy", "/usr/sbin/haproxy")
    cfg = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
    r = subprocess.run([program, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_relaygate_tcpserver_behind_haproxy(tmp_path: Path) -> None:
    """qmail's side: TCPREMOTEIP and the relay decision are the client's."""
    import os
    import sys

    from serve_harness import env

    program = need_program("haproxy", "/usr/sbin/haproxy")
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    port_file = tmp_path / "port"
    relaygate = [sys.executable, "-m", "relaygate"]
    with open(port_file, "wb") as out, open(tmp_path / "tcpserver.log", "wb") as err:
        proc = subprocess.Popen(
            [*relaygate, "--store", f"spool://{spool}", "tcpserver", "-1", "-R", "-H",
             "--trusted-proxy", PROXY_ADDRESS, "127.0.0.1", "0",
             "sh", "-c", 'echo "$TCPREMOTEIP ${RELAYCLIENT-none}"'],
            stdout=out, stderr=err, env=env(), start_new_session=True)
    h = None
    try:
        deadline = time.monotonic() + 30
        while not port_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "tcpserver.log").read_text()
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        h = HAProxy(tmp_path / "haproxy", [Route("qmail_v1", port, "send-proxy"),
                                           Route("qmail_v2", port, "send-proxy-v2")])
        h.start(program)

        def through(route: str) -> bytes:
            with socket.socket() as s:
                s.settimeout(20)
                s.bind((CLIENT, 0))
                s.connect((PROXY_ADDRESS, h.ports[route]))
                return s.makefile("rb").readline()

        assert through("qmail_v1") == f"{CLIENT} none\n".encode()
        r = subprocess.run([*relaygate, "--store", f"spool://{spool}", "allow", CLIENT],
                           capture_output=True, text=True, env=env(), timeout=60)
        assert r.returncode == 0, r.stderr
        assert through("qmail_v2") == f"{CLIENT} \n".encode()  # RELAYCLIENT="": relays
        assert os.listdir(spool) == [CLIENT]  # and nothing for the proxy
    finally:
        if h is not None:
            h.stop()
        proc.terminate()
        proc.wait(20)


def test_per_address_limit_counts_the_client_not_the_proxy(serve: Serve,
                                                           haproxy: HAProxy) -> None:
    """smtp.max_connections_per_ip (20) applies to each client behind the proxy."""
    port = haproxy.ports["smtp_v2"]
    held = []
    try:
        for _ in range(20):
            c = LineClient(CLIENT, PROXY_ADDRESS, port)
            held.append(c)
            assert c.line().startswith(b"220")
        extra = LineClient(CLIENT, PROXY_ADDRESS, port)
        held.append(extra)
        assert extra.line().startswith(b"421 4.7.0")
        # another client behind the same proxy is not affected
        other = LineClient(STRANGER, PROXY_ADDRESS, port)
        held.append(other)
        assert other.line().startswith(b"220")
    finally:
        for c in held:
            c.close()
