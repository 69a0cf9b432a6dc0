"""The accept layer: the Peer worked out once, the PROXY header from trusted proxies only."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relaygate.networks import Networks
from relaygate.protocols.proxy import build_v1, build_v2
from relaygate.servers.accept import Acceptor, Peer, ProxyPolicy, listen_tcp_or_unix

PROXY = "127.0.0.9"
CLIENT = "127.0.0.21"


class Recorder(asyncio.Protocol):
    """Records its Peer and the bytes it receives; answers each line with the peer."""

    def __init__(self, peer: Peer, seen: asyncio.Queue[tuple[Peer, bytes]]) -> None:
        self.peer = peer
        self.seen = seen
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.seen.put_nowait((self.peer, line))
            assert self.transport is not None
            self.transport.write(f"{self.peer.ip} {self.peer.proxy} {self.peer.local}\n"
                                 .encode())


@pytest.fixture
async def seen() -> asyncio.Queue[tuple[Peer, bytes]]:
    return asyncio.Queue()


async def _listener(seen: asyncio.Queue[tuple[Peer, bytes]], *, timeout: float = 2.0,
                    ssl_context: ssl.SSLContext | None = None) -> Acceptor:
    wrap = None
    if ssl_context is not None:
        from relaygate.servers.listeners import tls_acceptor

        context = ssl_context

        def wrap(make: Any, who: str) -> Any:
            return tls_acceptor(make, context, "test", 5.0, peer=who)

    return await listen_tcp_or_unix(
        "127.0.0.1", 0, None, lambda peer: Recorder(peer, seen), service="test",
        proxies=ProxyPolicy(Networks([f"{PROXY}/32"]), timeout), tls_wrap=wrap)


@pytest.fixture
async def listener(seen: asyncio.Queue[tuple[Peer, bytes]]) -> AsyncIterator[Acceptor]:
    lst = await _listener(seen)
    yield lst
    lst.close()
    await lst.wait_closed()


async def _closed(r: asyncio.StreamReader, timeout: float) -> bool:
    """True when the server closed the connection without a word (a reset counts:
    closing with the client's unread bytes in the buffer sends one)."""
    try:
        return await asyncio.wait_for(r.read(), timeout) == b""
    except ConnectionResetError:
        return True


async def _connect(lst: Acceptor, source: str, **kw: object) \
        -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = lst.sockets[0].getsockname()[1]
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), **kw)


async def test_trusted_proxy_v1_names_the_client_and_the_rest_is_untouched(
        listener: Acceptor, seen: asyncio.Queue[tuple[Peer, bytes]]) -> None:
    r, w = await _connect(listener, PROXY)
    # header and the client's first line in one segment, as a proxy may send them
    w.write(build_v1(("192.0.2.7", 4000), ("127.0.0.1", 25)) + b"HELLO\n")
    peer, line = await asyncio.wait_for(seen.get(), 5)
    assert peer == Peer("192.0.2.7", 4000, proxy=PROXY)
    assert line == b"HELLO"
    assert await r.readline() == b"192.0.2.7 127.0.0.9 False\n"
    w.close()


async def test_trusted_proxy_v2_ipv6_byte_by_byte(
        listener: Acceptor, seen: asyncio.Queue[tuple[Peer, bytes]]) -> None:
    _r, w = await _connect(listener, PROXY)
    data = build_v2(("2001:db8::7", 4000), ("::1", 25)) + b"X\n"
    for i in range(len(data)):
        w.write(data[i : i + 1])
        await w.drain()
        await asyncio.sleep(0.001)
    peer, line = await asyncio.wait_for(seen.get(), 5)
    assert (peer.ip, peer.proxy, line) == ("2001:db8::7", PROXY, b"X")
    w.close()


async def test_v2_local_is_the_proxys_own_connection(
        listener: Acceptor, seen: asyncio.Queue[tuple[Peer, bytes]]) -> None:
    _r, w = await _connect(listener, PROXY)
    w.write(build_v2(None, None, local=True) + b"ping\n")
    peer, _line = await asyncio.wait_for(seen.get(), 5)
    assert peer.ip == PROXY and peer.local and peer.proxy == PROXY
    w.close()


async def test_untrusted_header_is_data_not_an_address(
        listener: Acceptor, seen: asyncio.Queue[tuple[Peer, bytes]]) -> None:
    _r, w = await _connect(listener, CLIENT)
    w.write(b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 25\r\n")
    peer, line = await asyncio.wait_for(seen.get(), 5)
    assert peer.ip == CLIENT and peer.proxy is None
    assert line == b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 25\r"
    w.close()


async def test_trusted_proxy_without_header_is_closed_after_the_timeout(
        seen: asyncio.Queue[tuple[Peer, bytes]], caplog: pytest.LogCaptureFixture) -> None:
    lst = await _listener(seen, timeout=0.3)
    try:
        caplog.set_level(logging.INFO)
        r, w = await _connect(lst, PROXY)
        assert await _closed(r, 5)
        assert seen.empty()
        assert "proxy.refused" in caplog.text and "no PROXY header within 0.3s" in caplog.text
        w.close()
    finally:
        lst.close()
        await lst.wait_closed()


async def test_trusted_proxy_with_a_bad_header_is_closed_at_once(
        listener: Acceptor, seen: asyncio.Queue[tuple[Peer, bytes]],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r, w = await _connect(listener, PROXY)
    w.write(b"EHLO client\r\n")
    assert await _closed(r, 1)
    assert seen.empty()
    assert "no PROXY protocol signature" in caplog.text
    w.close()


async def test_trusted_proxy_closing_mid_header(
        listener: Acceptor, seen: asyncio.Queue[tuple[Peer, bytes]],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r, w = await _connect(listener, PROXY)
    w.write(b"PROXY TCP4 192.0.2.7")
    w.write_eof()
    assert await _closed(r, 5)
    assert "closed before the PROXY header ended" in caplog.text
    w.close()


async def test_implicit_tls_header_before_the_handshake(
        seen: asyncio.Queue[tuple[Peer, bytes]], tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    lst = await _listener(seen, ssl_context=server_ctx)
    try:
        port = lst.sockets[0].getsockname()[1]
        raw = socket.socket()
        raw.bind((PROXY, 0))
        raw.setblocking(False)
        await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", port))
        # the header goes out first, then TLS on the same connection (HAProxy's order)
        await asyncio.get_running_loop().sock_sendall(
            raw, build_v2(("198.51.100.4", 5000), ("127.0.0.1", port)))
        r, w = await asyncio.open_connection(sock=raw, ssl=client_ctx,
                                             server_hostname="localhost")
        w.write(b"over tls\n")
        peer, line = await asyncio.wait_for(seen.get(), 5)
        assert (peer.ip, peer.proxy, line) == ("198.51.100.4", PROXY, b"over tls")
        assert await r.readline() == b"198.51.100.4 127.0.0.9 False\n"
        w.close()
    finally:
        lst.close()
        await lst.wait_closed()


async def test_close_drops_connections_waiting_for_their_header(
        seen: asyncio.Queue[tuple[Peer, bytes]]) -> None:
    lst = await _listener(seen, timeout=30)
    r, w = await _connect(lst, PROXY)
    await asyncio.sleep(0.05)
    lst.close()
    await asyncio.wait_for(lst.wait_closed(), 2)
    assert await _closed(r, 2)
    w.close()


def test_proxy_policy_from_settings() -> None:
    from relaygate.config import load_settings

    s = load_settings(cli={"trusted_proxies": ["10.0.0.0/8", "2001:db8::1"],
                           "proxy_timeout": "2.5"})
    policy = ProxyPolicy.from_settings(s)
    assert "10.1.2.3" in policy.trusted and "2001:db8::1" in policy.trusted
    assert "11.0.0.1" not in policy.trusted and policy.timeout == 2.5
