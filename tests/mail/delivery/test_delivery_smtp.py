"""The SMTP client side of delivery: TLS, SMTPUTF8, address limits, connection reuse."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme

from relaygate.mail.delivery.routes import StaticResolver
from relaygate.mail.delivery.smtp_client import address_problem
from relaygate.mail.delivery.worker import DeliveryWorker, make_worker
from relaygate.mail.directory import StaticDirectory

from ..test_queue_helpers import (
    Sink,
    add_account,
    dsn_fields,
    maildir_messages,
    make_ctx,
    make_settings,
    message,
    wait_until,
)


def worker_for(ctx) -> DeliveryWorker:
    w = make_worker(ctx, resolver=StaticResolver())
    assert isinstance(w, DeliveryWorker)
    return w


async def deliver_all(ctx) -> None:
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: not ctx.queue.ids())
    finally:
        await w.stop(5)


def server_tls(*, require_client_cert: bool = False) -> ssl.SSLContext:
    ca = trustme.CA()
    cert = ca.issue_cert("sink.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    if require_client_cert:
        ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def test_opportunistic_starttls_with_untrusted_certificate(tmp_path: Path) -> None:
    sink = await Sink(tls_context=server_tls()).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("tls"))
    try:
        await deliver_all(ctx)
    finally:
        await sink.stop()
    (got,) = sink.received
    assert got.tls is True
    assert got.helo == "relay.test"


async def test_failed_tls_handshake_falls_back_to_plaintext(tmp_path: Path) -> None:
    sink = await Sink(tls_context=server_tls(require_client_cert=True)).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("notls"))
    try:
        await deliver_all(ctx)
    finally:
        await sink.stop()
    (got,) = sink.received
    assert got.tls is False
    assert sink.connections >= 2


async def test_plain_sink_without_starttls(tmp_path: Path) -> None:
    sink = await Sink().start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("plain"))
    try:
        await deliver_all(ctx)
    finally:
        await sink.stop()
    assert sink.received[0].tls is False


async def test_smtputf8_used_when_offered(tmp_path: Path) -> None:
    sink = await Sink(smtputf8=True).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    ctx.queue.enqueue("alice@local.test", ["jörg@bücher.test", "bob@remote.test"],
                      message("utf8"))
    try:
        await deliver_all(ctx)
    finally:
        await sink.stop()
    by_rcpt = {r: m for m in sink.received for r in m.rcpt_tos}
    assert "SMTPUTF8" in by_rcpt["jörg@bücher.test"].mail_options
    assert "SMTPUTF8" not in by_rcpt["bob@remote.test"].mail_options


async def test_non_ascii_recipient_bounced_without_smtputf8(tmp_path: Path) -> None:
    sink = await Sink(smtputf8=False).start()
    directory = StaticDirectory()
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)), directory)
    ctx.queue.enqueue("alice@local.test",
                      ["jörg@remote.test", "bob@remote.test", "carl@bücher.test"],
                      message("downgrade"))
    try:
        await deliver_all(ctx)
        await wait_until(lambda: bool(maildir_messages(alice.maildir)))
    finally:
        await sink.stop()
    # The IDN domain with an ASCII local part goes out in its A-label form.
    assert sorted(sink.delivered_to()) == ["bob@remote.test", "carl@xn--bcher-kva.test"]
    (dsn,) = (alice.maildir / "new").iterdir()
    raw = dsn.read_bytes()
    assert "Final-Recipient: utf-8; jörg@remote.test".encode() in raw
    assert b"Status: 5.6.7" in raw
    assert b"message/global-delivery-status" in raw


async def test_non_ascii_sender_without_smtputf8_bounces_all(tmp_path: Path) -> None:
    sink = await Sink(smtputf8=False).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    qid = ctx.queue.enqueue("jörg@elsewhere.test", ["bob@remote.test"], message("s"))
    w = worker_for(ctx)
    await w.start()
    try:
        # The recipient fails; the DSN goes to jörg via the same sink, which cannot take it.
        await wait_until(lambda: qid not in ctx.queue.ids())
        await wait_until(lambda: not ctx.queue.ids())
    finally:
        await w.stop(5)
        await sink.stop()
    assert sink.received == []
    kept = list((ctx.queue.quarantine_dir / "postmaster").iterdir())
    assert len(kept) == 1


@pytest.mark.parametrize("addr, why", [
    ("x" * 65 + "@remote.test", "local part longer than 64"),
    ("a@" + ".".join(["d" * 60] * 5) + ".test", "longer than 256 octets"),
    ("nodomain", "no domain"),
])
async def test_overlong_or_bad_recipient_bounced_before_connecting(
        tmp_path: Path, addr: str, why: str) -> None:
    sink = await Sink().start()
    directory = StaticDirectory()
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)), directory)
    ctx.queue.enqueue("alice@local.test", [addr], message("long"))
    try:
        await deliver_all(ctx)
        await wait_until(lambda: bool(maildir_messages(alice.maildir)))
    finally:
        await sink.stop()
    assert sink.connections == 0
    rcpt = dsn_fields(maildir_messages(alice.maildir)[0])[1]
    assert rcpt["Status"] == "5.1.3"
    assert why in rcpt["Diagnostic-Code"]


def test_address_problem_limits() -> None:
    assert address_problem("a" * 64 + "@example.com") is None
    assert address_problem("a" * 65 + "@example.com") is not None
    # 256 octets including the angle brackets is the maximum path.
    local = "l" * 60
    domain = ".".join(["d" * 63, "d" * 63, "d" * 63]) + ".c"
    addr = f"{local}@{domain}"[:254]
    assert len(addr) + 2 == 256
    assert address_problem(addr) is None
    assert address_problem(addr + "x") is not None
    assert address_problem("a\r\nb@example.com") is not None
    assert address_problem('"a b"@example.com') is None
    assert address_problem("a b@example.com") is not None
    bad_sender = address_problem("x" * 300, sender=True)
    assert bad_sender is not None and bad_sender.status == "5.1.7"


async def test_connection_reused_for_next_message(tmp_path: Path) -> None:
    sink = await Sink().start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",),
                                 concurrency=1, per_destination=1))
    for i in range(5):
        ctx.queue.enqueue("alice@local.test", [f"u{i}@remote.test"], message(f"r{i}"))
    try:
        await deliver_all(ctx)
    finally:
        await sink.stop()
    assert len(sink.received) == 5
    assert sink.connections == 1


async def test_connection_closed_by_server_while_cached(tmp_path: Path) -> None:
    sink = await Sink(idle_timeout=0.2).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    w = worker_for(ctx)
    await w.start()
    try:
        ctx.queue.enqueue("alice@local.test", ["a@remote.test"], message("first"))
        await wait_until(lambda: len(sink.received) == 1)
        await asyncio.sleep(0.5)
        ctx.queue.enqueue("alice@local.test", ["b@remote.test"], message("second"))
        await wait_until(lambda: len(sink.received) == 2 and not ctx.queue.ids())
    finally:
        await w.stop(5)
        await sink.stop()
    assert sink.connections == 2


async def test_data_rejected_permanently_and_temporarily(tmp_path: Path) -> None:
    seen = {"n": 0}

    def data(envelope) -> str | None:
        seen["n"] += 1
        if b"spam" in envelope.original_content:
            return "554 5.7.1 looks like spam"
        return "452 4.3.1 insufficient storage" if seen["n"] == 1 else None

    sink = await Sink(data=data).start()
    directory = StaticDirectory()
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)), directory)
    ctx.queue.enqueue("alice@local.test", ["a@remote.test"], message("ham"))
    try:
        await deliver_all(ctx)
        ctx.queue.enqueue("alice@local.test", ["b@remote.test"], message("spam"))
        await deliver_all(ctx)
    finally:
        await sink.stop()
    assert sink.delivered_to() == ["a@remote.test"]
    rcpt = dsn_fields(maildir_messages(alice.maildir)[0])[1]
    assert rcpt["Final-Recipient"] == "rfc822; b@remote.test"
    assert rcpt["Status"] == "5.7.1"
