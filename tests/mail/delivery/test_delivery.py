"""Delivery worker against loopback aiosmtpd sinks: outcomes, retries, bounces."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from relaygate.mail.delivery.routes import StaticResolver
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


def metric(ctx, event: str) -> float:
    return ctx.metrics.registry.get_sample_value("relaygate_messages_total", {"event": event}) or 0


def queue_empty(ctx) -> bool:
    return not ctx.queue.ids()


@pytest.fixture
async def sink():
    s = await Sink().start()
    yield s
    await s.stop()


def worker_for(ctx, resolver=None, mx_port=25) -> DeliveryWorker:
    w = make_worker(ctx, resolver=resolver or StaticResolver())
    assert isinstance(w, DeliveryWorker)
    w.mx_port = mx_port
    return w


async def test_success(tmp_path: Path, sink: Sink) -> None:
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    data = message("success")
    qid = ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], data)
    w = worker_for(ctx)
    assert w.name == "queue" and w.listeners() == []
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
    assert len(sink.received) == 1
    got = sink.received[0]
    assert got.mail_from == "alice@local.test"
    assert got.rcpt_tos == ["bob@remote.test"]
    assert got.data == data
    assert metric(ctx, "delivered") == 1
    assert not (ctx.queue.msg_dir / qid).exists()


async def test_enqueue_while_running_is_picked_up_at_once(tmp_path: Path, sink: Sink) -> None:
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    w = worker_for(ctx)
    await w.start()
    try:
        for i in range(5):
            await asyncio.to_thread(ctx.queue.enqueue, "alice@local.test",
                                    [f"bob{i}@remote.test"], message(f"m{i}"))
        await wait_until(lambda: len(sink.received) == 5 and queue_empty(ctx))
    finally:
        await w.stop(5)
    assert sorted(sink.delivered_to()) == [f"bob{i}@remote.test" for i in range(5)]


async def test_temporary_failure_then_success(tmp_path: Path) -> None:
    calls: list[str] = []

    def rcpt(addr: str) -> str | None:
        calls.append(addr)
        return "451 4.7.1 greylisted, try again" if len(calls) == 1 else None

    sink = await Sink(rcpt=rcpt).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    qid = ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("grey"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: len(sink.received) == 1 and queue_empty(ctx))
    finally:
        await w.stop(5)
        await sink.stop()
    assert calls == ["bob@remote.test", "bob@remote.test"]
    assert metric(ctx, "deferred") == 1
    assert metric(ctx, "delivered") == 1
    assert metric(ctx, "bounced") == 0
    assert qid not in ctx.queue.ids()


async def test_deferred_envelope_records_error_and_schedule(tmp_path: Path) -> None:
    sink = await Sink(rcpt=lambda a: "452 4.2.2 mailbox full").start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",),
                                 retry_schedule=(3600.0,)))
    qid = ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("full"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: ctx.queue.load(qid).attempts == 1)
    finally:
        await w.stop(5)
        await sink.stop()
    env = ctx.queue.load(qid)
    assert env.recipients[0].state == "pending"
    assert env.recipients[0].last_error == "452 4.2.2 mailbox full"
    assert env.last_error == "452 4.2.2 mailbox full"
    assert env.next_attempt >= env.created + 3500


async def test_permanent_failure_bounces_into_local_senders_maildir(tmp_path: Path) -> None:
    sink = await Sink(rcpt=lambda a: "550 5.1.1 <bob@remote.test>: no such user").start()
    directory = StaticDirectory()
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)), directory)
    original = message("doomed")
    qid = ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], original)
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx) and maildir_messages(alice.maildir))
    finally:
        await w.stop(5)
        await sink.stop()
    (dsn,) = maildir_messages(alice.maildir)
    assert dsn["Return-Path"] == "<>"
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert dsn["To"] == "<alice@local.test>"
    assert dsn.get_param("report-type") == "delivery-status"
    head, rcpt = dsn_fields(dsn)
    assert head["Reporting-MTA"] == "dns; relay.test"
    assert rcpt["Final-Recipient"] == "rfc822; bob@remote.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    third = dsn.get_payload()[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert "Subject: doomed" in third.get_payload()
    assert sink.received == []
    assert metric(ctx, "bounced") == 1
    assert qid not in ctx.queue.ids()


async def test_mixed_outcomes_for_several_recipients(tmp_path: Path) -> None:
    tries: dict[str, int] = {}

    def rcpt(addr: str) -> str | None:
        tries[addr] = tries.get(addr, 0) + 1
        if addr.startswith("bad"):
            return "550 5.1.1 unknown user"
        if addr.startswith("slow") and tries[addr] == 1:
            return "450 4.2.1 try later"
        return None

    sink = await Sink(rcpt=rcpt).start()
    directory = StaticDirectory()
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)), directory)
    ctx.queue.enqueue("alice@local.test",
                      ["good@remote.test", "bad@remote.test", "slow@other.test"],
                      message("mixed"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
        await sink.stop()
    assert sorted(sink.delivered_to()) == ["good@remote.test", "slow@other.test"]
    assert tries == {"good@remote.test": 1, "bad@remote.test": 1, "slow@other.test": 2}
    (dsn,) = maildir_messages(alice.maildir)
    blocks = dsn_fields(dsn)[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; bad@remote.test"]
    assert metric(ctx, "delivered") == 2
    assert metric(ctx, "bounced") == 1
    assert metric(ctx, "deferred") == 1


async def test_one_transaction_per_domain(tmp_path: Path, sink: Sink) -> None:
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    ctx.queue.enqueue("alice@local.test", ["a@one.test", "b@two.test", "c@one.test"],
                      message("grouped"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
    groups = sorted(sorted(m.rcpt_tos) for m in sink.received)
    assert groups == [["a@one.test", "c@one.test"], ["b@two.test"]]


async def test_null_mx_bounces_without_connecting(tmp_path: Path, sink: Sink) -> None:
    directory = StaticDirectory()
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path), directory)
    resolver = StaticResolver(mx_records={"nomail.test": [(0, ".")]},
                              hosts={"nomail.test": ["127.0.0.1"]})
    ctx.queue.enqueue("alice@local.test", ["x@nomail.test"], message("nullmx"))
    w = worker_for(ctx, resolver, mx_port=sink.port)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx) and maildir_messages(alice.maildir))
    finally:
        await w.stop(5)
    (dsn,) = maildir_messages(alice.maildir)
    rcpt = dsn_fields(dsn)[1]
    assert rcpt["Status"] == "5.1.10"
    assert rcpt["Diagnostic-Code"].startswith("x-relaygate; 556 5.1.10")
    assert sink.received == [] and sink.data_started == 0
    assert ("nomail.test", "A/AAAA") not in resolver.queries


async def test_mx_routing_through_stub_resolver(tmp_path: Path, sink: Sink) -> None:
    ctx = make_ctx(make_settings(tmp_path))
    resolver = StaticResolver(
        mx_records={"remote.test": [(20, "backup.remote.test"), (10, "mx.remote.test")]},
        hosts={"mx.remote.test": ["127.0.0.1"], "backup.remote.test": ["127.0.0.1"]})
    ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("mx"))
    w = worker_for(ctx, resolver, mx_port=sink.port)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
    assert sink.delivered_to() == ["bob@remote.test"]
    assert resolver.queries[:2] == [("remote.test", "MX"), ("mx.remote.test", "A/AAAA")]


async def test_dns_temporary_failure_defers(tmp_path: Path) -> None:
    from relaygate.mail.delivery.routes import DnsError

    ctx = make_ctx(make_settings(tmp_path, retry_schedule=(3600.0,)))
    resolver = StaticResolver(failures={
        "remote.test": DnsError("remote.test", "MX", "SERVFAIL", permanent=False)})
    qid = ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("dns"))
    w = worker_for(ctx, resolver)
    await w.start()
    try:
        await wait_until(lambda: ctx.queue.load(qid).attempts == 1)
    finally:
        await w.stop(5)
    r = ctx.queue.load(qid).recipients[0]
    assert r.state == "pending"
    assert r.last_error.startswith("451 4.4.3")


async def test_nxdomain_bounces(tmp_path: Path) -> None:
    directory = StaticDirectory()
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path), directory)
    ctx.queue.enqueue("alice@local.test", ["bob@nowhere.test"], message("nx"))
    w = worker_for(ctx, StaticResolver())
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx) and maildir_messages(alice.maildir))
    finally:
        await w.stop(5)
    assert dsn_fields(maildir_messages(alice.maildir)[0])[1]["Status"] == "5.1.2"


async def test_queue_lifetime_reached(tmp_path: Path) -> None:
    sink = await Sink(rcpt=lambda a: "421 4.3.2 system not accepting messages").start()
    directory = StaticDirectory()
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",),
                                 lifetime=0.6, retry_schedule=(0.1, 0.2)), directory)
    ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("expire"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx) and maildir_messages(alice.maildir))
    finally:
        await w.stop(5)
        await sink.stop()
    (dsn,) = maildir_messages(alice.maildir)
    rcpt = dsn_fields(dsn)[1]
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.4.7"
    # The diagnostic is the last thing the server said; the human part says why we gave up.
    assert rcpt["Diagnostic-Code"].startswith("smtp; 421 4.3.2")
    assert "gave up after" in dsn.get_payload()[0].get_payload()
    assert metric(ctx, "deferred") >= 1


async def test_delay_warning_then_delivery(tmp_path: Path) -> None:
    state = {"n": 0}

    def rcpt(addr: str) -> str | None:
        state["n"] += 1
        return "451 4.4.5 busy" if state["n"] <= 3 else None

    sink = await Sink(rcpt=rcpt).start()
    directory = StaticDirectory()
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",),
                                 delay_warning=0.15, retry_schedule=(0.1,)), directory)
    ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("slow"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
        await sink.stop()
    msgs = maildir_messages(alice.maildir)
    assert len(msgs) == 1
    assert msgs[0]["Subject"] == "Delayed Mail (still being retried)"
    rcpt_block = dsn_fields(msgs[0])[1]
    assert rcpt_block["Action"] == "delayed"
    assert rcpt_block["Status"].startswith("4.")
    assert "Will-Retry-Until" in rcpt_block
    assert sink.delivered_to() == ["bob@remote.test"]


async def test_remote_sender_gets_bounce_through_queue_with_null_sender(
        tmp_path: Path) -> None:
    sink = await Sink(rcpt=lambda a: "550 5.7.1 rejected" if a == "bob@remote.test" else None
                      ).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    ctx.queue.enqueue("carol@elsewhere.test", ["bob@remote.test"], message("rb"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx) and len(sink.received) == 1)
    finally:
        await w.stop(5)
        await sink.stop()
    (bounce,) = sink.received
    assert bounce.mail_from == "<>" or bounce.mail_from == ""
    assert bounce.rcpt_tos == ["carol@elsewhere.test"]
    assert b"multipart/report" in bounce.data
    assert b"Status: 5.7.1" in bounce.data


async def test_double_bounce_goes_to_postmaster_maildir(tmp_path: Path) -> None:
    sink = await Sink(rcpt=lambda a: "550 5.1.1 no").start()
    directory = StaticDirectory()
    postmaster = add_account(directory, tmp_path, "postmaster")
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)), directory)
    ctx.queue.enqueue("", ["gone@remote.test"], message("a bounce", sender="MAILER-DAEMON"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx) and maildir_messages(postmaster.maildir))
    finally:
        await w.stop(5)
        await sink.stop()
    (copy,) = maildir_messages(postmaster.maildir)
    assert copy["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert copy["To"] == "<postmaster@local.test>"
    assert copy.get_payload()[2].get_content_type() == "message/rfc822"
    # Exactly one SMTP attempt: a bounce is never bounced back to <>.
    assert sink.received == []


async def test_double_bounce_without_postmaster_is_kept(tmp_path: Path) -> None:
    sink = await Sink(rcpt=lambda a: "550 5.1.1 no").start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)),
                   StaticDirectory())
    ctx.queue.enqueue("", ["gone@remote.test"], message("orphan bounce"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
        await sink.stop()
    kept = list((ctx.queue.quarantine_dir / "postmaster").iterdir())
    assert len(kept) == 1
    assert b"Subject: orphan bounce" in kept[0].read_bytes()


async def test_corrupt_envelope_is_quarantined_and_worker_goes_on(tmp_path: Path,
                                                                   sink: Sink) -> None:
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    q = ctx.queue
    bad = q.new_id()
    (q.msg_dir / bad).write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    (q.env_dir / bad).write_bytes(b'{"version": 1, "id": "not it", "sender": ')
    wrong = q.new_id()
    (q.msg_dir / wrong).write_bytes(b"Subject: y\r\n\r\nbody\r\n")
    (q.env_dir / wrong).write_text(json.dumps({"version": 1, "id": wrong, "sender": "a@b",
                                               "recipients": "nobody", "created": 1}))
    good = q.enqueue("alice@local.test", ["bob@remote.test"], message("good"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx) and len(sink.received) == 1)
    finally:
        await w.stop(5)
    names = sorted(p.name for p in q.quarantine_dir.iterdir())
    for qid in (bad, wrong):
        assert f"{qid}.env" in names and f"{qid}.msg" in names and f"{qid}.why" in names
    assert "corrupt envelope" in (q.quarantine_dir / f"{bad}.why").read_text()
    assert good not in q.ids()


async def test_message_file_missing_is_quarantined(tmp_path: Path, sink: Sink) -> None:
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    qid = ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("lost"))
    (ctx.queue.msg_dir / qid).unlink()
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
    assert (ctx.queue.quarantine_dir / f"{qid}.env").exists()
    assert "missing" in (ctx.queue.quarantine_dir / f"{qid}.why").read_text()


async def test_local_domain_recipients_go_to_maildir(tmp_path: Path, sink: Sink) -> None:
    directory = StaticDirectory()
    dave = add_account(directory, tmp_path, "dave")
    alice = add_account(directory, tmp_path, "alice")
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)), directory)
    ctx.queue.enqueue("alice@local.test", ["dave@local.test", "nobody@local.test"],
                      message("local"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx) and maildir_messages(alice.maildir))
    finally:
        await w.stop(5)
    (got,) = maildir_messages(dave.maildir)
    assert got["Return-Path"] == "<alice@local.test>"
    assert got["Subject"] == "local"
    assert dsn_fields(maildir_messages(alice.maildir)[0])[1]["Status"] == "5.1.1"
    assert sink.received == []


async def test_rcpthosts_file_domains_are_local_too(tmp_path: Path, sink: Sink) -> None:
    """The worker's local domains are the SMTP server's: a qmail rcpthosts file, any spelling."""
    rcpthosts = tmp_path / "rcpthosts"
    rcpthosts.write_text("local.test\n.sub.test\n")
    directory = StaticDirectory()
    dave = add_account(directory, tmp_path, "dave")
    alice = add_account(directory, tmp_path, "alice", domain="x.sub.test")
    postmaster = add_account(directory, tmp_path, "postmaster")
    settings = make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)).replace(
        domains=(), rcpthosts_file=rcpthosts)
    ctx = make_ctx(settings, directory)
    ctx.queue.enqueue("alice@X.Sub.Test.", ["dave@LOCAL.test", "nobody@local.test"],
                      message("rcpthosts"))
    # A failed bounce goes to the postmaster at the first rcpthosts domain.
    ctx.queue.enqueue("", ["gone@local.test"], message("a bounce"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx) and maildir_messages(alice.maildir)
                         and maildir_messages(postmaster.maildir))
    finally:
        await w.stop(5)
    (got,) = maildir_messages(dave.maildir)
    assert got["Subject"] == "rcpthosts"
    (dsn,) = maildir_messages(alice.maildir)
    assert dsn_fields(dsn)[1]["Final-Recipient"] == "rfc822; nobody@local.test"
    (copy,) = maildir_messages(postmaster.maildir)
    assert copy["To"] == "<postmaster@local.test>"
    assert sink.received == []


async def test_reload_rereads_rcpthosts_and_smtproutes(tmp_path: Path) -> None:
    from relaygate.errors import ConfigError

    rcpthosts = tmp_path / "rcpthosts"
    rcpthosts.write_text("local.test\n")
    routes = tmp_path / "smtproutes"
    routes.write_text("remote.test:127.0.0.1:2525\n")
    settings = make_settings(tmp_path).replace(domains=(), rcpthosts_file=rcpthosts,
                                               smtproutes_file=routes)
    w = worker_for(make_ctx(settings))
    assert not w.rcpthosts.is_local("new.test")
    rcpthosts.write_text("local.test\nnew.test\n")
    routes.write_text("remote.test:127.0.0.1:2626\n")
    w.reload()
    assert w.rcpthosts.is_local("new.test")
    route = w.routes.lookup("remote.test")
    assert route is not None and route.relay is not None and route.relay.port == 2626
    # A bad file raises (serve logs it) and both old tables stay.
    rcpthosts.write_text("other.test\n")
    routes.write_text("remote.test:[::1\n")
    with pytest.raises(ConfigError):
        w.reload()
    assert w.rcpthosts.is_local("new.test") and not w.rcpthosts.is_local("other.test")
    route = w.routes.lookup("remote.test")
    assert route is not None and route.relay is not None and route.relay.port == 2626


async def test_per_destination_limit(tmp_path: Path) -> None:
    sink = await Sink(gather=2).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",),
                                 concurrency=10, per_destination=2))
    for i in range(8):
        ctx.queue.enqueue("alice@local.test", [f"u{i}@remote.test"], message(f"c{i}"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
        await sink.stop()
    assert len(sink.received) == 8
    assert sink.max_active == 2


async def test_global_limit(tmp_path: Path) -> None:
    sink = await Sink(gather=3).start()
    routes = tuple(f"d{i}.test:127.0.0.1:{sink.port}" for i in range(6))
    ctx = make_ctx(make_settings(tmp_path, routes=routes, concurrency=3, per_destination=5))
    for i in range(6):
        ctx.queue.enqueue("alice@local.test", [f"u@d{i}.test"], message(f"g{i}"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
        await sink.stop()
    assert len(sink.received) == 6
    assert sink.max_active == 3


async def test_flush_retries_now(tmp_path: Path) -> None:
    state = {"refuse": True}
    sink = await Sink(rcpt=lambda a: "451 4.3.0 later" if state["refuse"] else None).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",),
                                 retry_schedule=(3600.0,)))
    qid = ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("flush"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: ctx.queue.load(qid).attempts == 1)
        state["refuse"] = False
        ctx.queue.request_flush()
        await wait_until(lambda: queue_empty(ctx))
    finally:
        await w.stop(5)
        await sink.stop()
    assert sink.delivered_to() == ["bob@remote.test"]


async def test_stop_cancels_after_grace_and_keeps_message(tmp_path: Path) -> None:
    sink = await Sink(data_delay=30).start()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    qid = ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("slow"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: sink.data_started == 1)
    finally:
        await w.stop(0.1)
        await sink.stop()
    env = ctx.queue.load(qid)
    assert env.recipients[0].state == "pending"
    # The lock is released: another worker may start now.
    ctx.queue.lock().release()


async def test_second_worker_on_same_queue_refused(tmp_path: Path, sink: Sink) -> None:
    from relaygate.mail.queue import QueueBusy

    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    w1 = worker_for(ctx)
    w2 = worker_for(ctx)
    await w1.start()
    try:
        with pytest.raises(QueueBusy):
            await w2.start()
    finally:
        await w1.stop(1)


async def test_connection_refused_defers(tmp_path: Path) -> None:
    from conftest import free_port

    port = free_port()
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{port}",),
                                 retry_schedule=(3600.0,)))
    qid = ctx.queue.enqueue("alice@local.test", ["bob@remote.test"], message("refused"))
    w = worker_for(ctx)
    await w.start()
    try:
        await wait_until(lambda: ctx.queue.load(qid).attempts == 1)
    finally:
        await w.stop(1)
    r = ctx.queue.load(qid).recipients[0]
    assert r.state == "pending"
    assert r.last_error.startswith("451 4.4.1 connect to 127.0.0.1[127.0.0.1]")


async def test_run_once(tmp_path: Path, sink: Sink) -> None:
    ctx = make_ctx(make_settings(tmp_path, routes=(f":127.0.0.1:{sink.port}",)))
    for i in range(3):
        ctx.queue.enqueue("alice@local.test", [f"u{i}@remote.test"], message(f"o{i}"))
    w = worker_for(ctx)
    n = await w.run_once()
    assert n == 3
    assert queue_empty(ctx)
    assert len(sink.received) == 3


def test_bad_smtproutes_line_stops_start_up(tmp_path: Path) -> None:
    from relaygate.errors import ConfigError

    routes = tmp_path / "smtproutes"
    routes.write_text("example.com:relay.example.net\nexample.org:[::1\n")
    settings = make_settings(tmp_path).replace(smtproutes_file=routes)
    with pytest.raises(ConfigError) as err:
        make_worker(make_ctx(settings))
    assert err.value.source == str(routes)
    assert err.value.line == 2
    assert err.value.value == "example.org:[::1"
