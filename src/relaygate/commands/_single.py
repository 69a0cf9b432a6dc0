"""Run one login service alone (``relaygate pop3d``/``imapd``): the part they share.

Opens the store and the users, builds the service, binds it, then waits for
SIGTERM/SIGINT (stop, letting sessions in flight finish within
``shutdown_grace``) or SIGHUP (re-read the users, and the service's own
``reload()`` when it has one). Exit codes: 0 after a clean stop, 2 when no
listener is configured, 111 when the store, the user database, the
configuration or a listener fails.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import click

from relaygate.cli import EXIT_TEMPFAIL


async def run_login_service(prog: str, settings: Any, make_service: Callable[[Any], Any]) -> int:
    from relaygate.context import Context
    from relaygate.errors import ConfigError
    from relaygate.log import setup_logging
    from relaygate.mail.accounts.db import UserDBError, open_directory
    from relaygate.metrics import Metrics
    from relaygate.runtime import build_control
    from relaygate.servers.listeners import reload_certificate

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
        try:
            await service.start()
        except OSError as exc:
            click.echo(f"relaygate {prog}: cannot listen: {exc}", err=True)
            return EXIT_TEMPFAIL
        click.echo(f"relaygate {prog}: {', '.join(service.listeners())}", err=True)

        def reload() -> None:
            directory.reload()
            if ctx.ssl_context is not None:
                reload_certificate(ctx.ssl_context, settings)
            if callable(getattr(service, "reload", None)):
                service.reload()

        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        loop.add_signal_handler(signal.SIGINT, done.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            await done.wait()
        finally:
            await service.stop(settings.shutdown_grace)
        return 0
    finally:
        directory.close()
        control.store.close()
