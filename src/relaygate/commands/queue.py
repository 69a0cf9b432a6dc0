"""``relaygate queue``: look at, retry, delete and run the outbound queue.

The queue lives in ``<data-dir>/queue`` (format: :mod:`relaygate.mail.queue`).
``list``/``show`` only read it and are safe while a worker runs. ``flush``
asks the running worker (``serve`` or ``queue run``) to retry everything now,
or, when none runs, marks every message due. ``delete`` removes a message
(a delivery already in flight may still complete), or every deferred one.
``hold`` and ``release`` take messages out of delivery and put them back, as
``postsuper -h``/``-H`` do. With ``--quarantine`` the commands work on what
the worker set aside (corrupt envelopes, orphans, double bounces). ``run``
is the delivery worker in the foreground, for setups that do not use
``relaygate serve``.

Exit codes: 0 ok; 1 no such message; 2 usage (e.g. ``delete`` without
``--yes``); 111 temporary failure (configuration error, queue locked by
another worker, disk error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import click

from relaygate.cli import settings_from
from relaygate.config import Settings
from relaygate.log import duration
from relaygate.mail.delivery.dsn import original_headers
from relaygate.mail.queue import (
    ID_RE,
    CorruptEnvelope,
    Envelope,
    QuarantineItem,
    Queue,
    QueueBusy,
    QueueError,
)

log = logging.getLogger("relaygate.queue")


def _open(ctx: click.Context) -> tuple[Settings, Queue]:
    """The queue of an existing data directory (never invented: see ``relaygate list``)."""
    settings = settings_from(ctx)
    if not settings.data_dir.is_dir():
        from relaygate.errors import ConfigError

        raise ConfigError(f"no data directory: {settings.data_dir.absolute()} does not exist; "
                          "give --data-dir or --config (or $RELAYGATE_DATA_DIR) for the one "
                          "serve uses")
    return settings, Queue(settings.data_dir / "queue")


def _qid(value: str) -> str:
    v = value.strip().lower()
    if not ID_RE.fullmatch(v):
        raise click.BadParameter(f"not a queue id: {value!r} (24 hex digits, see `queue list`)")
    return v


def _env_dict(env: Envelope, now: float, held: bool = False) -> dict[str, Any]:
    return {
        "held": held,
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
    relaygate queue delete --all-deferred --yes
                                    remove every message that has failed a try
    relaygate queue hold ID|--all   keep messages from delivery
    relaygate queue release ID|--all
                                    put held messages back, due now
    relaygate queue list --quarantine
                                    corrupt envelopes, orphans, double bounces
    relaygate queue release --quarantine NAME [--to ADDRESS]
    relaygate queue delete --quarantine NAME --yes
    relaygate queue run [--once]    run the delivery worker in the foreground
    """


@queue.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of envelopes.")
@click.option("--quarantine", is_flag=True,
              help="List the quarantine instead: corrupt envelopes, orphaned messages and "
                   "double bounces, with the name `release`/`delete --quarantine` take.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool, quarantine: bool) -> None:
    """List queued messages: id, sender, recipients, age, attempts, next try, last error.

    Messages on hold show "held" as their next try. The last error is shown
    whole, however long.
    """
    _, q = _open(ctx)
    now = time.time()
    if quarantine:
        _list_quarantine(q, now, as_json)
        return
    items: list[tuple[Envelope | tuple[str, CorruptEnvelope], bool]] = [
        (item, False) for item in q.envelopes()]
    items += [(item, True) for item in q.held_envelopes()]
    items.sort(key=lambda pair: pair[0][0] if isinstance(pair[0], tuple) else pair[0].id)
    if as_json:
        out = []
        for item, held in items:
            if isinstance(item, tuple):
                out.append({"id": item[0], "held": held, "corrupt": str(item[1])})
            else:
                out.append(_env_dict(item, now, held))
        click.echo(json.dumps(out, ensure_ascii=False))
        return
    rows: list[tuple[str, ...]] = [
        ("ID", "SENDER", "RECIPIENTS", "AGE", "TRIES", "NEXT", "LAST ERROR")]
    for item, held in items:
        if isinstance(item, tuple):
            rows.append((item[0], "-", "-", "-", "-", "held" if held else "-",
                         f"corrupt envelope: {item[1]}"))
            continue
        pending = item.pending()
        first = pending[0].addr if pending else item.recipients[0].addr
        more = len(pending) - 1 if pending else len(item.recipients) - 1
        rcpts = first + (f" (+{more})" if more > 0 else "")
        nxt = "now" if item.next_attempt <= now else f"in {duration(item.next_attempt - now)}"
        if not pending:
            nxt = "bounce"
        if held:
            nxt = "held"
        err = " ".join((item.last_error or "-").split())
        rows.append((item.id, item.sender or "<>", rcpts, duration(now - item.created),
                     str(item.attempts), nxt, err))
    _table(rows)
    if len(rows) == 1:
        click.echo("(queue is empty)", err=True)


def _table(rows: list[tuple[str, ...]]) -> None:
    # The last column is printed whole (error texts are what an admin reads).
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True))
                   + "  " + r[-1])


def _list_quarantine(q: Queue, now: float, as_json: bool) -> None:
    items = q.quarantined()
    if as_json:
        click.echo(json.dumps([
            {"name": i.name, "kind": i.kind, "when": i.when, "age": round(now - i.when, 3),
             "size": i.size, "reason": i.reason, "paths": [str(p) for p in i.paths]}
            for i in items], ensure_ascii=False))
        return
    rows: list[tuple[str, ...]] = [("NAME", "KIND", "AGE", "SIZE", "REASON")]
    for i in items:
        rows.append((i.name, i.kind, duration(now - i.when), str(i.size),
                     " ".join(i.reason.split())))
    _table(rows)
    if not items:
        click.echo("(quarantine is empty)", err=True)


def _quarantined(ctx: click.Context, q: Queue, name: str) -> QuarantineItem:
    try:
        item = q.find_quarantined(name.strip())
    except QueueError as exc:
        raise click.BadParameter(str(exc)) from None
    if item is None:
        click.echo(f"nothing called {name} in the quarantine (see `queue list --quarantine`)",
                   err=True)
        ctx.exit(1)
    assert item is not None
    return item


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
    click.echo(f"arrived:      {_fmt(env.created)} ({duration(now - env.created)} ago)")
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
@click.argument("queue_ids", metavar="[ID]...", nargs=-1)
@click.option("--all-deferred", is_flag=True,
              help="Delete every message that has failed at least one try (postsuper -d ALL "
                   "deferred).")
@click.option("--quarantine", "quarantined", metavar="NAME",
              help="Delete this quarantined item (name from `queue list --quarantine`).")
@click.option("--yes", is_flag=True, help="Really delete (required).")
@click.pass_context
def delete(ctx: click.Context, queue_ids: tuple[str, ...], all_deferred: bool,
           quarantined: str | None, yes: bool) -> None:
    """Delete messages from the queue without bouncing them (needs --yes).

    A delivery of a message already in progress may still complete. Exit
    status 1 when a named message is not there.
    """
    if sum(1 for x in (queue_ids, all_deferred, quarantined) if x) != 1:
        raise click.UsageError("give message ids, --all-deferred or --quarantine NAME")
    qids = [_qid(v) for v in queue_ids]
    what = " ".join(qids) or ("every deferred message" if all_deferred else quarantined)
    if not yes:
        raise click.UsageError(f"refusing to delete {what} without --yes")
    _, q = _open(ctx)
    if quarantined is not None:
        item = _quarantined(ctx, q, quarantined)
        q.delete_quarantined(item)
        click.echo(f"deleted {item.name} from the quarantine")
        return
    if all_deferred:
        n = 0
        for env in [*q.envelopes(), *q.held_envelopes()]:
            if not isinstance(env, tuple) and env.attempts > 0 and q.delete(env.id):
                n += 1
        click.echo(f"deleted {n} deferred message{'s' if n != 1 else ''}")
        return
    missing = 0
    for qid in qids:
        if q.delete(qid):
            click.echo(f"deleted {qid}")
        else:
            click.echo(f"no message {qid} in the queue", err=True)
            missing += 1
    ctx.exit(1 if missing else 0)


@queue.command("hold")
@click.argument("queue_ids", metavar="[ID]...", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Hold every queued message.")
@click.pass_context
def hold(ctx: click.Context, queue_ids: tuple[str, ...], all_: bool) -> None:
    """Keep messages from delivery until `queue release` (postsuper -h).

    A delivery already in flight still finishes its try. Exit status 1 when a
    named message is not queued.
    """
    if bool(queue_ids) == all_:
        raise click.UsageError("give message ids or --all")
    qids = [_qid(v) for v in queue_ids]
    _, q = _open(ctx)
    if all_:
        qids = q.ids()
    missing = 0
    for qid in qids:
        if q.hold(qid):
            click.echo(f"held {qid}")
        elif not all_:
            click.echo(f"no queued message {qid}", err=True)
            missing += 1
    if all_:
        click.echo(f"{len(qids)} message{'s' if len(qids) != 1 else ''} on hold", err=True)
    ctx.exit(1 if missing else 0)


@queue.command("release")
@click.argument("queue_ids", metavar="[ID]...", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Release every held message.")
@click.option("--quarantine", "quarantined", metavar="NAME",
              help="Put this quarantined item back into the queue instead.")
@click.option("--to", "to", metavar="ADDRESS",
              help="With --quarantine: whom an orphan or a double bounce goes to (it has no "
                   "envelope of its own; double bounces default to the postmaster).")
@click.pass_context
def release(ctx: click.Context, queue_ids: tuple[str, ...], all_: bool,
            quarantined: str | None, to: str | None) -> None:
    """Put held messages back into delivery, due now (postsuper -H).

    With --quarantine NAME, requeue a quarantined item: a repaired envelope
    goes back with its own recipients; an orphan or a double bounce is sent
    with the null sender to --to. A running worker sees released messages
    within a minute, or at once after `queue flush`. Exit status 1 when a
    named message is not held.
    """
    if sum(1 for x in (queue_ids, all_, quarantined) if x) != 1:
        raise click.UsageError("give message ids, --all or --quarantine NAME")
    if to is not None and quarantined is None:
        raise click.UsageError("--to goes with --quarantine")
    settings, q = _open(ctx)
    if quarantined is not None:
        item = _quarantined(ctx, q, quarantined)
        if to is None and item.kind == "double-bounce":
            to = _postmaster(settings)
        try:
            qid = q.release_quarantined(item, to)
        except QueueError as exc:
            click.echo(str(exc), err=True)
            ctx.exit(1)
            return
        click.echo(f"released {item.name} as {qid}" + (f" to <{to}>" if to else ""))
        return
    qids = q.held_ids() if all_ else [_qid(v) for v in queue_ids]
    missing = 0
    for qid in qids:
        try:
            done = q.release(qid)
        except CorruptEnvelope as exc:
            click.echo(f"held message {qid}: corrupt envelope ({exc})", err=True)
            missing += 1
            continue
        if done:
            click.echo(f"released {qid}")
        else:
            click.echo(f"no held message {qid}", err=True)
            missing += 1
    ctx.exit(1 if missing else 0)


def _postmaster(settings: Settings) -> str:
    pm = settings.queue.postmaster
    return pm if "@" in pm else f"{pm}@{settings.local_domains[0]}"


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
    from relaygate.context import Context
    from relaygate.log import setup_logging
    from relaygate.mail.delivery.worker import make_worker
    from relaygate.metrics import Metrics
    from relaygate.servers.runtime import Runtime

    settings = settings_from(ctx)
    setup_logging(settings.log_format, settings.log_level)
    q = Queue(settings.data_dir / "queue")
    context = Context(settings, _control(settings), Metrics(), _directory(settings), q)
    worker = make_worker(context)
    wait = grace if grace is not None else float(settings.shutdown_grace)

    async def main() -> None:
        if once:
            n = await worker.run_once()
            log.info("queue run --once: worked on %d message(s)", n)
            return
        runtime = Runtime("queue", context, [worker], grace=wait)
        runtime.install_signals()
        await runtime.start()
        log.info("queue worker running on %s", q.directory)
        try:
            await runtime.wait()
        finally:
            log.info("queue worker stopping (grace %.0fs)", wait)
            await runtime.shutdown()

    try:
        asyncio.run(main())
    finally:
        if context.directory is not None:
            context.directory.close()


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
