"""TlsAcceptor: the implicit-TLS listeners' own wait for the first TLS record."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from relaygate.servers.listeners import stream_factory, tls_acceptor


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    import trustme

    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pem)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def serve(server_ctx: ssl.SSLContext, made: list[int], timeout: float = 5.0
                ) -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert writer.get_extra_info("ssl_object") is not None
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    plain = stream_factory(echo, 1024)

    def factory() -> asyncio.BaseProtocol:
        made.append(1)
        return plain()

    server = await asyncio.get_running_loop().create_server(
        tls_acceptor(factory, server_ctx, "test", timeout), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_handshake_and_echo(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    made: list[int] = []
    server, port = await serve(contexts[0], made)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=contexts[1],
                                                       server_hostname="127.0.0.1")
        writer.write(b"hello\r\n")
        assert await reader.readline() == b"hello\r\n"
        writer.close()
    assert made == [1]


async def test_client_hello_in_single_bytes(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    made: list[int] = []
    server, port = await serve(contexts[0], made)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = contexts[1].wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        for byte in outgoing.read():
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data
                incoming.write(data)
        writer.write(outgoing.read())
        tls.write(b"split\r\n")
        writer.write(outgoing.read())
        got = b""
        while not got.endswith(b"\r\n"):
            try:
                got += tls.read()
            except ssl.SSLWantReadError:
                incoming.write(await asyncio.wait_for(reader.read(65536), 10))
        assert got == b"split\r\n"
        writer.close()
    assert made == [1]


@pytest.mark.parametrize("payload", [b"\x16\x03\x01garbage" * 10, b"EHLO plain\r\n",
                                     b"\x16\x03\x01\x00\x00"])
async def test_not_a_handshake_is_closed_without_a_session(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], payload: bytes) -> None:
    made: list[int] = []
    server, port = await serve(contexts[0], made)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert made == []


async def test_silent_client_is_closed_at_the_handshake_timeout(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    made: list[int] = []
    server, port = await serve(contexts[0], made, timeout=0.3)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03")  # half a header, then nothing
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert made == []
