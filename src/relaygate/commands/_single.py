"""Run services alone (``relaygate smtpd``/``pop3d``/``imapd``/``policyd``/``queue run``).

Every one of them runs through :class:`relaygate.servers.runtime.Runtime`, the
lifecycle ``serve`` uses: SIGTERM/SIGINT stop (work in flight may finish within
``shutdown_grace``; a second signal stops waiting), SIGHUP re-reads the rules,
the TLS certificate, the users and what each service reads itself. Exit codes:
0 after a clean stop, 2 when no listener is configured, 111 when the store, the
user database, the configuration or a listener fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from relaygate.cli import EXIT_TEMPFAIL

if TYPE_CHECKING:
    from relaygate.context import Context
    from relaygate.interfaces import Service


async def run_services(prog: str, ctx: Context, services: Sequence[Service], *,
                       announce: Callable[[list[str]], None] | None = None,
                       grace: float | None = None) -> int:
    """Start ``services``, serve until SIGTERM/SIGINT, stop them; the exit code."""
    from relaygate.servers.runtime import Runtime, StartError

    runtime = Runtime(prog, ctx, services, grace=grace)
    runtime.install_signals()
    try:
        await runtime.start()
    except StartError as exc:
        click.echo(f"relaygate {prog}: cannot listen: {exc.why}", err=True)
        return EXIT_TEMPFAIL
    lines = [line for svc in services for line in svc.listeners()]
    if announce is None:
        click.echo(f"relaygate {prog}: {', '.join(lines)}", err=True)
    else:
        announce(lines)
    try:
        await runtime.wait()
    finally:
        await runtime.shutdown()
    return 0


async def run_login_service(prog: str, settings: Any, make_service: Callable[[Any], Any]) -> int:
    """``pop3d``/``imapd``: the store, the users and one login service."""
    from relaygate.context import Context
    from relaygate.errors import ConfigError
    from relaygate.log import setup_logging
    from relaygate.mail.accounts.db import UserDBError, open_directory
    from relaygate.metrics import Metrics
    from relaygate.runtime import build_control

    setup_logging(settings.log_format, settings.log_level)
    try:
        control = build_control(settings)
        directory = open_directory(settings)
    except UserDBError as exc:
        click.echo(f"relaygate {prog}: {exc}", err=True)
        return EXIT_TEMPFAIL
    try:
        try:
            ctx = Context(settings, control, Metrics(), directory)
            service = make_service(ctx)
        except ConfigError as exc:
            click.echo(f"relaygate {prog}: configuration error: {exc}", err=True)
            return EXIT_TEMPFAIL
        if not service.listeners():
            click.echo(f"relaygate {prog}: no listeners configured", err=True)
            return 2
        return await run_services(prog, ctx, [service])
    finally:
        directory.close()
        control.store.close()
