"""``relaygate pop3d``: run only the POP3 service (logins open relay windows).

For hosts that want POP-before-SMTP without the rest of ``relaygate serve``
(e.g. in front of qmail or Postfix sharing the same grant store), and for the
login benchmark. Signals: SIGTERM/SIGINT stop (idle sessions are cut at once,
RETR/QUIT in progress may finish within ``shutdown_grace``); SIGHUP re-reads
the users and the TLS certificate. Exit codes: 0 after a clean stop; 2 when no
listener is configured; 111 when a listener cannot be bound or the store, the
user database or the TLS certificate cannot be opened.
"""

from __future__ import annotations

import asyncio
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
              help="POP3 listener, repeatable; 'off' disables (default 127.0.0.1:1110).")
@click.option("--listen-tls", multiple=True, metavar="HOST:PORT",
              help="Implicit-TLS POP3 listener, repeatable; only with --tls-cert "
                   "(default 127.0.0.1:1995).")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="PEM certificate chain (enables STLS and the TLS listeners).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key.")
@click.option("--hostname", help="Name in the APOP timestamp (default: this host's name).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log level (default info).")
@log_destination_options
@trusted_proxy_option
@click.pass_context
def pop3d(ctx: click.Context, /, **opts: Any) -> None:
    """Run the POP3 server alone (RFC 1939 with CAPA, STLS, APOP, AUTH PLAIN).

    Users come from the data directory's users.db (`relaygate users add`);
    mail from their Maildirs. Each successful login opens the relay window of
    the client's address in the grant store (--store).
    """
    overrides: dict[str, Any] = {
        "pop3.listen": list(opts["listen"]) or None,
        "pop3.listen_tls": list(opts["listen_tls"]) or None,
        "tls.cert": opts["tls_cert"],
        "tls.key": opts["tls_key"],
        "hostname": opts["hostname"],
        "log_level": opts["log_level"],
        **log_destination(opts),
        "trusted_proxies": list(opts["trusted_proxies"]) or None,
    }
    settings = settings_from(ctx, **overrides)
    ctx.exit(asyncio.run(_main(settings)))



async def _main(settings: Any) -> int:
    from relaygate.commands._single import run_login_service
    from relaygate.servers.pop3 import make_service

    return await run_login_service("pop3d", settings, make_service)
