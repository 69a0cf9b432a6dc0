"""The per-connection plumbing every server shares (servers/listeners.py): loopback decided
on bound addresses, the peer address parsed once, per-address limits, one TLS context
builder (TLS 1.2 at least: a TLS 1.1 client is refused by smtps, pop3s and imaps), and the
window opened after a login, which no store failure or store bug can turn into a failed
login."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme

from relaygate.config import ImapSettings, Pop3Settings, Settings, SmtpSettings, TlsSettings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.errors import ConfigError, StoreError
from relaygate.grants import Grant
from relaygate.interfaces import Account
from relaygate.mail.directory import StaticDirectory
from relaygate.metrics import Metrics
from relaygate.servers.listeners import (
    AddressLimiter,
    Listen,
    Listener,
    loopback_sockname,
    open_window_after_login,
    parse_listen,
    peer_address,
    resolves_to_loopback,
    server_tls_context,
    tls_context_of,
)
from relaygate.stores.memory import MemoryStore

# -- loopback: the bound address decides, never the host name's text ----------------


def test_loopback_socket_addresses() -> None:
    assert loopback_sockname(("127.0.0.1", 25))
    assert loopback_sockname(("127.9.8.7", 25))
    assert loopback_sockname(("::1", 25, 0, 0))
    assert loopback_sockname(("::ffff:127.0.0.1", 25, 0, 0))
    assert loopback_sockname("/run/relaygate/smtp.sock")
    assert not loopback_sockname(("0.0.0.0", 25))
    assert not loopback_sockname(("::", 25, 0, 0))
    assert not loopback_sockname(("192.0.2.1", 25))
    assert not loopback_sockname(("fe80::1%lo", 25, 0, 1))


def _resolving_to(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            if not answers[host]:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6,
                     "", (a, int(port or 0))) for a in answers[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_a_name_that_looks_like_loopback_is_not_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 13 item 5: "127.0.0.1.nip.io" was loopback because of its first four characters
    _resolving_to(monkeypatch, {"127.0.0.1.nip.io": ["203.0.113.9"], "127.bad": [],
                                "mixed.test": ["127.0.0.1", "192.0.2.1"]})
    assert not resolves_to_loopback(parse_listen("127.0.0.1.nip.io:2525"))
    assert not resolves_to_loopback(parse_listen("127.bad:2525"))  # does not resolve
    assert not resolves_to_loopback(parse_listen("mixed.test:2525"))
    assert resolves_to_loopback(parse_listen("127.0.0.1:2525"))
    assert resolves_to_loopback(parse_listen("[::1]:2525"))
    assert resolves_to_loopback(parse_listen("unix:/run/x.sock"))
    assert not resolves_to_loopback(parse_listen(":2525"))
    assert not resolves_to_loopback(parse_listen("192.0.2.1:2525"))


def test_serve_trial_mode_decides_on_the_resolved_address(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Root without --user may run only loopback trial listeners: a name is resolved."""
    from relaygate.servers import serve as serve_mod

    _resolving_to(monkeypatch, {"127.0.0.1.nip.io": ["203.0.113.9"],
                                "localhost": ["127.0.0.1", "::1"]})
    only = dict(listen=(), submission=(), smtps=())

    def trial(smtp_listen: str) -> bool:
        s = Settings(data_dir=tmp_path, smtp=SmtpSettings(**{**only, "listen": (smtp_listen,)}),
                     pop3=Pop3Settings(listen=(), listen_tls=()),
                     imap=ImapSettings(listen=(), listen_tls=()))
        return serve_mod._trial_listeners_only(s)

    assert trial("127.0.0.1:2525")
    assert trial("localhost:2525")
    assert not trial("127.0.0.1.nip.io:2525")
    assert not trial("127.0.0.1:25")  # privileged port: not a trial


async def test_listener_loopback_comes_from_the_bound_sockets(tmp_path: Path) -> None:
    accepted: list[bool] = []

    async def bind(listen: Listen) -> Listener:
        listener = Listener("test", listen)

        async def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: object) -> None:
            accepted.append(listener.loopback)
            writer.close()

        await listener.bind_streams(cb)
        return listener

    for n, listen in enumerate((Listen("127.0.0.1", 0), Listen("localhost", 0),
                                Listen(None, None, str(tmp_path / "s.sock"))), start=1):
        listener = await bind(listen)
        try:
            assert listener.loopback and listener.addresses
            if listen.path is None:
                _, w = await asyncio.open_connection("127.0.0.1", listener.ports()[0])
            else:
                assert listener.addresses == [f"unix:{listen.path}"]
                _, w = await asyncio.open_unix_connection(listen.path)
            w.close()
            for _ in range(500):
                if len(accepted) == n:
                    break
                await asyncio.sleep(0.01)
        finally:
            listener.close()
            await listener.wait_closed()
    # every connection saw the decision already made (accepting starts after it)
    assert accepted == [True, True, True]


# -- the client address, parsed once ----------------------------------------------------


class _Transport:
    def __init__(self, peer: object) -> None:
        self.peer = peer

    def get_extra_info(self, name: str) -> object:
        return self.peer if name == "peername" else None


def test_peer_address_is_canonical_or_none() -> None:
    assert peer_address(_Transport(("127.0.0.1", 4321))) == "127.0.0.1"  # type: ignore[arg-type]
    assert peer_address(_Transport(("::FFFF:192.0.2.7", 1, 0, 0))) == "192.0.2.7"  # type: ignore[arg-type]
    assert peer_address(_Transport(("2001:DB8:0:0::1", 1, 0, 0))) == "2001:db8::1"  # type: ignore[arg-type]
    assert peer_address(_Transport("")) is None  # type: ignore[arg-type]  # UNIX socket
    assert peer_address(_Transport(None)) is None  # type: ignore[arg-type]


def test_address_limiter() -> None:
    lim = AddressLimiter(2)
    assert lim.acquire("192.0.2.1") and lim.acquire("192.0.2.1")
    assert not lim.acquire("192.0.2.1")
    assert lim.acquire("192.0.2.2")
    lim.release("192.0.2.1")
    assert lim.acquire("192.0.2.1")
    for _ in range(3):
        lim.release("192.0.2.1")
    assert "192.0.2.1" not in lim.counts  # nothing left behind
    assert all(lim.acquire(None) for _ in range(10))  # UNIX clients are not counted
    local = AddressLimiter(1, unix_key="unix")  # POP3 counts local clients together
    assert local.acquire(None) and not local.acquire(None)
    local.release(None)
    assert local.acquire(None)


# -- TLS -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _cert(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    return cert, key


def test_one_tls_builder_requires_tls_1_2(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = _cert(ca, tmp_path)
    assert server_tls_context(Settings()) is None
    context = server_tls_context(Settings(tls=TlsSettings(cert, key)))
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
    bad = tmp_path / "bad.pem"
    bad.write_text("no\n")
    with pytest.raises(ConfigError) as info:
        server_tls_context(Settings(tls=TlsSettings(bad, bad)))
    assert info.value.source == "tls.cert" and info.value.value == str(bad)


def test_every_service_of_a_context_shares_one_tls_context(ca: trustme.CA,
                                                            tmp_path: Path) -> None:
    from relaygate.servers.imap.service import make_service as imap_service
    from relaygate.servers.pop3 import make_service as pop3_service
    from relaygate.servers.smtp.service import make_services as smtp_services

    cert, key = _cert(ca, tmp_path)
    ctx = _context(tmp_path, Settings(data_dir=tmp_path, tls=TlsSettings(cert, key)))
    shared = tls_context_of(ctx)
    assert shared is not None
    assert pop3_service(ctx).ssl_context is shared
    assert imap_service(ctx).ssl_context is shared
    assert {id(s.tls_context) for s in smtp_services(ctx)} == {id(shared)}  # type: ignore[attr-defined]


def _context(tmp_path: Path, settings: Settings, store: Any = None) -> Context:
    directory = StaticDirectory()
    directory.add(Account("alice", "example.test", tmp_path / "mail" / "alice"), "pw")
    return Context(settings, RelayControl(store or MemoryStore(), expiry=600), Metrics(),
                   directory)


def _tls11_client(ca: trustme.CA) -> ssl.SSLContext:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1_1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1 at all
    return client


async def _implicit_tls_services(tmp_path: Path, ca: trustme.CA) -> tuple[list[Any], Context]:
    from relaygate.servers.imap.service import make_service as imap_service
    from relaygate.servers.pop3 import make_service as pop3_service
    from relaygate.servers.smtp.service import make_services as smtp_services

    cert, key = _cert(ca, tmp_path)
    s = Settings(data_dir=tmp_path, hostname="mx.example.test", tls=TlsSettings(cert, key),
                 smtp=SmtpSettings(listen=(), submission=(), smtps=("127.0.0.1:0",)),
                 pop3=Pop3Settings(listen=(), listen_tls=("127.0.0.1:0",)),
                 imap=ImapSettings(listen=(), listen_tls=("127.0.0.1:0",)))
    ctx = _context(tmp_path, s)
    services = [*smtp_services(ctx), pop3_service(ctx), imap_service(ctx)]
    for svc in services:
        await svc.start()
    return services, ctx


def _port(svc: Any) -> int:
    line = svc.listeners()[0]
    return int(line.rpartition(":")[2])


async def test_tls_1_1_client_is_refused_by_smtps_pop3s_and_imaps(
        ca: trustme.CA, tmp_path: Path) -> None:
    """Issue 13 item 8. A TLS 1.2 client connects to the same ports (the test is not vacuous)."""
    services, _ = await _implicit_tls_services(tmp_path, ca)
    try:
        assert [s.name for s in services] == ["smtps", "pop3", "imap"]
        good = ssl.create_default_context()
        ca.configure_trust(good)
        for svc in services:
            port = _port(svc)
            # refused in the handshake: an alert, or the connection cut before it is read
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _, w = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=_tls11_client(ca), server_hostname="127.0.0.1"), 10)
                w.close()
            r, w = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=good, server_hostname="127.0.0.1"), 10)
            greeting = await asyncio.wait_for(r.readline(), 10)
            assert greeting[:3] in (b"220", b"+OK", b"* O"), (svc.name, greeting)
            assert w.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            w.close()
    finally:
        for svc in services:
            await svc.stop(0)


# -- the window opened after a login ----------------------------------------------------


class _BrokenStore(MemoryStore):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def put(self, grant: Grant) -> None:
        raise self.exc


@pytest.mark.parametrize("exc", [StoreError("redis is down"), RuntimeError("a store bug")])
async def test_a_failing_store_never_fails_the_login(exc: Exception, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    ctx = _context(tmp_path, Settings(data_dir=tmp_path), _BrokenStore(exc))
    alice = Account("alice", "example.test", tmp_path)
    with caplog.at_level(logging.WARNING, logger="relaygate"):
        assert await open_window_after_login(ctx, "192.0.2.7", alice, "imap") is None
    assert ctx.metrics.windows.labels("failed")._value.get() == 1
    assert any("could not open the relay window of 192.0.2.7" in r.getMessage()
               for r in caplog.records)
    # a bug keeps its traceback for the admin; a store outage does not need one
    assert any(r.exc_info for r in caplog.records) == isinstance(exc, RuntimeError)


async def test_window_opened_and_refreshed(tmp_path: Path) -> None:
    store = MemoryStore()
    ctx = _context(tmp_path, Settings(data_dir=tmp_path), store)
    alice = Account("alice", "example.test", tmp_path)
    assert await open_window_after_login(ctx, None, alice, "pop3") is None  # UNIX client
    grant = await open_window_after_login(ctx, "192.0.2.7", alice, "pop3")
    assert grant is not None and (grant.ip, grant.user, grant.domain, grant.source) == (
        "192.0.2.7", "alice", "example.test", "pop3")
    assert grant.expires_at - grant.opened_at == 600
    again = await open_window_after_login(ctx, "192.0.2.7", alice, "imap", refresh=True)
    assert again is not None and again.opened_at >= grant.opened_at
    assert ctx.metrics.windows.labels("opened")._value.get() == 1
    assert ctx.metrics.windows.labels("refreshed")._value.get() == 1
