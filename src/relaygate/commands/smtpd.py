"""``relaygate smtpd``: the SMTP server alone, on listeners or on stdin/stdout.

Listener mode runs the smtp, submission and (with a certificate) smtps
listeners until SIGTERM/SIGINT, then lets transactions in flight finish for
``shutdown_grace`` seconds; SIGHUP re-reads rcpthosts, the rules, the users and
the TLS certificate (the lifecycle of :mod:`relaygate.servers.runtime`).
``--stdio`` runs one session on descriptors 0/1 for tcpserver, where
qmail-smtpd would run::

    tcpserver -x rules.cdb 0 25 relay-ctrl-check relaygate smtpd --stdio

Environment read in ``--stdio`` mode (as qmail-smtpd reads it):

``TCPREMOTEIP``  the client address (logged, used by ``--use-store``);
``TCPLOCALIP``   our address: a loopback one allows plaintext AUTH;
``RELAYCLIENT``  set: the client may relay, its value is appended to every
                 relayed recipient; unset: only local domains are accepted
                 (unless ``--use-store`` asks the rules and grant store);
``USER``, ``DOMAIN``  with RELAYCLIENT, whose login opened the window (what
                 ``relay-ctrl-check`` exports), for attribution and sender binding.

Exit status: 0 after a session or a clean stop; 111 when the configuration,
the store or a listener cannot be set up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import click

from relaygate.cli import (
    log_destination,
    log_destination_options,
    settings_from,
    trusted_proxy_option,
)


@click.command()
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="SMTP listener, repeatable ([V6]:PORT, unix:PATH; 'off' disables; "
                   "default 127.0.0.1:2525).")
@click.option("--submission", multiple=True, metavar="HOST:PORT",
              help="Submission listener (RFC 6409), repeatable (default 127.0.0.1:2587).")
@click.option("--smtps", multiple=True, metavar="HOST:PORT",
              help="Implicit-TLS listener, only with a certificate (default 127.0.0.1:2465).")
@click.option("--domain", "domains", multiple=True, metavar="DOMAIN",
              help="Local domain (accepted from anyone), repeatable.")
@click.option("--rcpthosts", "rcpthosts_file", type=click.Path(dir_okay=False),
              help="qmail control/rcpthosts file of local domains (morercpthosts next to it "
                   "is read too).")
@click.option("--hostname", help="Name in the greeting and Received: lines.")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="PEM certificate chain (enables STARTTLS and smtps).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key.")
@click.option("--sender-binding/--no-sender-binding", default=None,
              help="Relay only MAIL FROM addresses of the user whose login allowed it.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log level (default info).")
@click.option("--stdio", is_flag=True,
              help="Run one session on stdin/stdout (under tcpserver), taking TCPREMOTEIP "
                   "and RELAYCLIENT from the environment.")
@click.option("--use-store", is_flag=True,
              help="With --stdio: when RELAYCLIENT is not set, ask the rules and grant store "
                   "(no relay-ctrl-check needed).")
@log_destination_options
@trusted_proxy_option
@click.pass_context
def smtpd(ctx: click.Context, /, **opts: Any) -> None:
    """Run the SMTP server with relay control (smtp, submission, smtps).

    Mail to local domains is accepted from anyone; mail to other domains only
    from clients with an open POP/IMAP window, a static rule, or SMTP AUTH.
    Local mail goes into Maildirs, relayed mail into the queue (delivered by
    `relaygate serve`).
    """
    def many(name: str) -> list[str] | None:
        return list(opts.get(name) or ()) or None

    overrides: dict[str, Any] = {
        "smtp.listen": many("listen"),
        "smtp.submission": many("submission"),
        "smtp.smtps": many("smtps"),
        "domains": many("domains"),
        "rcpthosts_file": opts["rcpthosts_file"],
        "hostname": opts["hostname"],
        "tls.cert": opts["tls_cert"],
        "tls.key": opts["tls_key"],
        "sender_binding": opts["sender_binding"],
        "log_level": opts["log_level"],
        **log_destination(opts),
        "trusted_proxies": many("trusted_proxies"),
    }
    settings = settings_from(ctx, **overrides)
    from relaygate.log import configure_logging

    configure_logging(settings)
    if settings.log_level != "debug":
        # aiosmtpd logs every command line at INFO; keep only its warnings.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    if opts["stdio"]:
        ctx.exit(_run_stdio(settings, use_store=opts["use_store"], environ=dict(os.environ)))
    ctx.exit(asyncio.run(_run_listeners(settings)))


def _open_parts(settings: Any) -> tuple[Any, Any]:
    """The user directory and the queue, when their modules are installed."""
    log = logging.getLogger("relaygate.smtp")
    directory = queue = None
    try:
        from relaygate.mail.accounts.db import open_directory
    except ImportError:
        log.warning("no user database module: local mailboxes and AUTH are unavailable")
    else:
        directory = open_directory(settings)
    try:
        from relaygate.mail.queue import Queue
    except ImportError:
        log.warning("no queue module: relayed mail is refused with 451")
    else:
        queue = Queue(settings.data_dir / "queue")
    return directory, queue


def _context(settings: Any, *, control: Any = None) -> Any:
    from relaygate.context import Context
    from relaygate.metrics import Metrics
    from relaygate.runtime import build_control

    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory, queue = _open_parts(settings)
    from relaygate.mail.rcpthosts import warn_addresses_outside

    warn_addresses_outside(settings, directory)
    return Context(settings, control or build_control(settings), Metrics(), directory, queue)


async def _run_listeners(settings: Any) -> int:
    from relaygate.commands._single import run_services
    from relaygate.servers.smtp.service import make_services

    ctx = _context(settings)
    try:
        services = make_services(ctx)
        if not services:
            raise click.UsageError("no SMTP listener configured")

        def announce(lines: list[str]) -> None:
            for line in lines:
                click.echo(f"relaygate smtpd: {line}")

        return await run_services("smtpd", ctx, services, announce=announce)
    finally:
        ctx.control.store.close()
        if ctx.directory is not None:
            ctx.directory.close()


def _run_stdio(settings: Any, *, use_store: bool, environ: dict[str, str]) -> int:
    from relaygate.addresses import is_loopback, parse_ip
    from relaygate.control import RelayControl
    from relaygate.decision import Decision, Verdict
    from relaygate.errors import InvalidAddress
    from relaygate.servers.smtp.service import serve_stdio
    from relaygate.stores.memory import MemoryStore

    log = logging.getLogger("relaygate.smtp")
    remote: str | None = None
    try:
        remote = parse_ip(environ.get("TCPREMOTEIP", ""))
    except InvalidAddress:
        log.warning("TCPREMOTEIP is missing or not an address; the client may not relay")
    try:
        local_loopback = is_loopback(parse_ip(environ.get("TCPLOCALIP", "")))
    except InvalidAddress:
        local_loopback = False
    fixed: Decision | None
    if "RELAYCLIENT" in environ:
        fixed = Decision(Verdict.ALLOW, "RELAYCLIENT set in the environment", "env",
                         relayclient=environ["RELAYCLIENT"], user=environ.get("USER") or None,
                         domain=environ.get("DOMAIN") or None, source="env")
    elif use_store:
        fixed = None
    else:
        fixed = Decision(Verdict.DENY, "RELAYCLIENT not set", "env")
    # Without --use-store nothing asks the store: do not pay for opening it.
    control = None if use_store else RelayControl(MemoryStore(), expiry=settings.expiry)
    ctx = _context(settings, control=control)
    try:
        asyncio.run(serve_stdio(ctx, remote_ip=remote, fixed=fixed,
                                local_loopback=local_loopback))
    finally:
        ctx.control.store.close()
    return 0
