"""``relaygate imapd``: run only the IMAP service (logins open relay windows).

For hosts that want IMAP-before-SMTP without the rest of ``relaygate serve``
(e.g. beside qmail or Postfix sharing the same grant store), and for the login
benchmark. Signals: SIGTERM/SIGINT stop (every session gets ``BYE``, commands
in progress may finish within ``shutdown_grace``); SIGHUP re-reads the users
and the TLS certificate. Exit codes: 0 after a clean stop; 2 with no
listener; 111 when a listener cannot be bound, or the store, the user
database or the certificate cannot be opened.
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
              help="IMAP listener, repeatable; 'off' disables (default 127.0.0.1:1143).")
@click.option("--listen-tls", multiple=True, metavar="HOST:PORT",
              help="Implicit-TLS IMAP listener, repeatable; only with --tls-cert "
                   "(default 127.0.0.1:1993).")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="PEM certificate chain (enables STARTTLS and the TLS listeners).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key.")
@click.option("--hostname", help="Name in the greeting (default: this host's name).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log level (default info).")
@log_destination_options
@trusted_proxy_option
@click.pass_context
def imapd(ctx: click.Context, /, **opts: Any) -> None:
    """Run the IMAP server alone (IMAP4rev1 with STARTTLS, IDLE, UIDPLUS, LITERAL+).

    Users come from the data directory's users.db (`relaygate users add`);
    mail from their Maildirs (INBOX is the Maildir, other folders are
    Maildir++ subfolders). Each successful login opens the relay window of
    the client's address in the grant store (--store), and a session that
    stays connected keeps it open.
    """
    overrides: dict[str, Any] = {
        "imap.listen": list(opts["listen"]) or None,
        "imap.listen_tls": list(opts["listen_tls"]) or None,
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
    from relaygate.servers.imap.service import make_service

    return await run_login_service("imapd", settings, make_service)
