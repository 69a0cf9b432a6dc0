"""``relaygate queue``: look at, retry, delete and run the outbound queue.

The queue lives in ``<data-dir>/queue`` (format: :mod:`relaygate.mail.queue`).
``list``/``show`` only read it and are safe while a worker runs. ``flush``
asks the running worker (``serve`` or ``queue run``) to retry everything now,
or, when none runs, marks every message due. ``delete`` removes a message
(a delivery already in flight may still complete). ``run`` is the delivery
worker in the foreground, for setups that do not use ``relaygate serve``.

Exit codes: 0 ok; 1 no such message; 2 usage (e.g. ``delete`` without
``--yes``); 111 temporary failure (configuration error, queue locked by
another worker, disk error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from typing import Any

import click

from relaygate.cli import settings_from
from relaygate.config import Settings
from relaygate.mail.delivery.dsn import original_headers
from relaygate.mail.queue import (
    ID_RE,
    CorruptEnvelope,
    Envelope,
    Queue,
    QueueBusy,
)

log = logging.getLogger("relaygate.queue")


def _open(ctx: click.Context) -> tuple[Settings, Queue]:
    settings = settings_from(ctx)
    return settings, Queue(settings.data_dir / "queue")


def _qid(value: str) -> str:
    v = value.strip().lower()
    if not ID_RE.fullmatch(v):
        raise click.BadParameter(f"not a queue id: {value!r} (24 hex digits, see `queue list`)")
    return v


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _env_dict(env: Envelope, now: float) -> dict[str, Any]:
    return {
        "id": env.id,
        "sender": env.sender,
        "recipients": [
            {"addr": r.addr, "state": r.state, "attempts": r.attempts,
             "last_error": r.last_error, "status": r.status, "remote_mta": r.remote_mta,
             "notified": r.notified}
            for r in env.recipients],
        "created": env.created,
        "age": round(now - env.created, 3),
        "size": env.size,
        "attempts": env.attempts,
        "next_attempt": env.next_attempt,
        "last_error": env.last_error,
        "warned": env.warned,
    }


@click.group("queue")
def queue() -> None:
    """The outbound queue: relayed mail not yet delivered or bounced.

    \b
    relaygate queue list            what is queued (id, sender, recipients, age, ...)
    relaygate queue show ID         one message: envelope and headers
    relaygate queue flush           retry everything now
    relaygate queue delete ID --yes remove a message (no bounce is sent)
    relaygate queue run [--once]    run the delivery worker in the foreground
    """


@queue.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of envelopes.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List queued messages: id, sender, recipients, age, attempts, next try, last error."""
    _, q = _open(ctx)
    now = time.time()
    items = list(q.envelopes())
    if as_json:
        out = []
        for item in items:
            if isinstance(item, tuple):
                out.append({"id": item[0], "corrupt": str(item[1])})
            else:
                out.append(_env_dict(item, now))
        click.echo(json.dumps(out, ensure_ascii=False))
        return
    rows = [("ID", "SENDER", "RECIPIENTS", "AGE", "TRIES", "NEXT", "LAST ERROR")]
    for item in items:
        if isinstance(item, tuple):
            rows.append((item[0], "-", "-", "-", "-", "-", f"corrupt envelope: {item[1]}"))
            continue
        pending = item.pending()
        first = pending[0].addr if pending else item.recipients[0].addr
        more = len(pending) - 1 if pending else len(item.recipients) - 1
        rcpts = first + (f" (+{more})" if more > 0 else "")
        nxt = "now" if item.next_attempt <= now else f"in {_age(item.next_attempt - now)}"
        if not pending:
            nxt = "bounce"
        err = (item.last_error or "-").replace("\n", " ")
        rows.append((item.id, item.sender or "<>", rcpts, _age(now - item.created),
                     str(item.attempts), nxt, err[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True))
                   + "  " + r[-1])
    if len(rows) == 1:
        click.echo("(queue is empty)", err=True)


@queue.command("show")
@click.argument("queue_id")
@click.option("--json", "as_json", is_flag=True, help="Envelope and headers as JSON.")
@click.pass_context
def show(ctx: click.Context, queue_id: str, as_json: bool) -> None:
    """Show one message's envelope and headers (exit 1 if there is no such message)."""
    qid = _qid(queue_id)
    _, q = _open(ctx)
    now = time.time()
    try:
        env = q.load(qid)
    except FileNotFoundError:
        click.echo(f"no message {qid} in the queue", err=True)
        ctx.exit(1)
        return
    except CorruptEnvelope as exc:
        click.echo(f"message {qid}: corrupt envelope ({exc})", err=True)
        ctx.exit(1)
        return
    try:
        headers = original_headers(q.read_message(qid)).decode("utf-8", "replace")
    except FileNotFoundError:
        headers = "(message file missing)\n"
    if as_json:
        click.echo(json.dumps({"envelope": _env_dict(env, now), "headers": headers},
                              ensure_ascii=False))
        return
    click.echo(f"id:           {env.id}")
    click.echo(f"sender:       <{env.sender}>")
    click.echo(f"arrived:      {_fmt(env.created)} ({_age(now - env.created)} ago)")
    click.echo(f"size:         {env.size}")
    click.echo(f"attempts:     {env.attempts}")
    click.echo(f"next attempt: {_fmt(env.next_attempt)}")
    if env.last_error:
        click.echo(f"last error:   {env.last_error}")
    click.echo("recipients:")
    for r in env.recipients:
        extra = f"  ({r.last_error})" if r.last_error else ""
        click.echo(f"  {r.state:8} {r.addr}  tries={r.attempts}{extra}")
    click.echo("")
    click.echo(headers.replace("\r\n", "\n").rstrip("\n"))


def _fmt(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@queue.command("flush")
@click.pass_context
def flush(ctx: click.Context) -> None:
    """Retry every queued message now.

    With a worker running (serve or queue run) it is told through the queue's
    flush file and retries within a second; otherwise every message is marked
    due and goes out when a worker starts.
    """
    _, q = _open(ctx)
    try:
        lock = q.lock()
    except QueueBusy:
        q.request_flush()
        click.echo("asked the running delivery worker to retry every message now")
        return
    with lock:
        n = q.reschedule_all(time.time())
    click.echo(f"no delivery worker is running; {n} message{'s' if n != 1 else ''} "
               "marked due (they go out when `relaygate serve` or `relaygate queue run` starts)")


@queue.command("delete")
@click.argument("queue_id")
@click.option("--yes", is_flag=True, help="Really delete (required).")
@click.pass_context
def delete(ctx: click.Context, queue_id: str, yes: bool) -> None:
    """Delete a message from the queue without bouncing it (needs --yes).

    A delivery of that message already in progress may still complete.
    """
    qid = _qid(queue_id)
    if not yes:
        raise click.UsageError(f"refusing to delete {qid} without --yes")
    _, q = _open(ctx)
    if q.delete(qid):
        click.echo(f"deleted {qid}")
        return
    click.echo(f"no message {qid} in the queue", err=True)
    ctx.exit(1)


@queue.command("run")
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.option("--grace", type=click.FloatRange(min=0), default=None,
              help="Seconds to let deliveries finish after SIGTERM (default: shutdown_grace).")
@click.pass_context
def run(ctx: click.Context, once: bool, grace: float | None) -> None:
    """Run the delivery worker in the foreground until SIGTERM (or, with --once, until
    nothing is due).

    Only one worker can run per queue directory: this fails with exit 111 while
    `relaygate serve` (or another `queue run`) is delivering from it.
    """
    from relaygate.log import setup_logging
    from relaygate.mail.queue import make_worker
    from relaygate.metrics import Metrics
    from relaygate.servers.base import Context

    settings = settings_from(ctx)
    setup_logging(settings.log_format, settings.log_level)
    q = Queue(settings.data_dir / "queue")
    context = Context(settings, _control(settings), Metrics(), _directory(settings), q)
    worker = make_worker(context)
    wait = grace if grace is not None else float(getattr(settings, "shutdown_grace", 30.0))

    async def main() -> None:
        from relaygate.mail.delivery.worker import DeliveryWorker

        assert isinstance(worker, DeliveryWorker)
        if once:
            n = await worker.run_once()
            log.info("queue run --once: worked on %d message(s)", n)
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await worker.start()
        log.info("queue worker running on %s", q.directory)
        try:
            await stop.wait()
        finally:
            log.info("queue worker stopping (grace %.0fs)", wait)
            await worker.stop(wait)

    try:
        asyncio.run(main())
    finally:
        close = getattr(context.directory, "close", None)
        if callable(close):
            close()


def _control(settings: Settings) -> Any:
    # The worker never asks for relay decisions: an in-memory control keeps
    # `queue run` independent of the grant store (which may be down).
    from relaygate.control import RelayControl
    from relaygate.stores.memory import MemoryStore

    return RelayControl(MemoryStore(), expiry=settings.expiry)


def _directory(settings: Settings) -> Any:
    """The user directory when one exists (local bounces, postmaster), else None."""
    if not (settings.data_dir / "users.db").exists():
        return None
    from relaygate.mail.accounts.db import open_directory

    return open_directory(settings)
