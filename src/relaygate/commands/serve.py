"""``relaygate serve``, ``relaygate init`` and ``relaygate status``.

``serve`` runs the whole system (see :mod:`relaygate.servers.serve`);
``init`` writes a commented ``relaygate.toml`` with every setting; ``status``
shows services, windows, queue and recent errors, whether or not serve runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from relaygate.cli import (
    log_destination,
    log_destination_options,
    settings_from,
    trusted_proxy_option,
)

F = TypeVar("F", bound=Callable[..., Any])


def _listen_option(name: str, what: str, default: str) -> Callable[[F], F]:
    return click.option(name, multiple=True, metavar="HOST:PORT",
                        help=f"{what} listener, HOST:PORT or [V6]:PORT (default {default}); "
                             "repeatable; 'off' turns it off.")


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML configuration file (see `relaygate init`).")
@click.option("--envdir", type=click.Path(file_okay=False),
              help="envdir-style directory with RELAY_CTRL_* variables.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Data directory: grants, users, Maildirs, queue (default ./relaygate-data).")
@click.option("--domain", "domains", multiple=True, metavar="DOMAIN",
              help="Local domain, repeatable (default: this host's name).")
@click.option("--hostname", help="Name in greetings and Received: lines (default: host name).")
@_listen_option("--smtp", "SMTP", "127.0.0.1:2525")
@_listen_option("--submission", "Submission", "127.0.0.1:2587")
@_listen_option("--smtps", "Implicit-TLS submission (only with a certificate)", "127.0.0.1:2465")
@_listen_option("--pop3", "POP3", "127.0.0.1:1110")
@_listen_option("--pop3s", "POP3S (only with a certificate)", "127.0.0.1:1995")
@_listen_option("--imap", "IMAP", "127.0.0.1:1143")
@_listen_option("--imaps", "IMAPS (only with a certificate)", "127.0.0.1:1993")
@click.option("--policy", multiple=True, metavar="HOST:PORT",
              help="Postfix policy service listener (HOST:PORT or unix:PATH, repeatable; "
                   "default off).")
@click.option("--socketmap", multiple=True, metavar="HOST:PORT",
              help="Socketmap listener for Sendmail and Postfix (HOST:PORT or unix:PATH, "
                   "repeatable; default off).")
@click.option("--store", metavar="URL",
              help="Grant store URL (default SQLite in the data directory; redis://HOST:PORT/DB "
                   "to share windows between hosts).")
@click.option("--expiry", metavar="SECONDS", help="Relay window length (default 900).")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False),
              help="Static rules file (tcprules syntax, CIDR). Reloaded on SIGHUP.")
@click.option("--smtproutes", "smtproutes_file", type=click.Path(dir_okay=False),
              help="qmail smtproutes file (domain:host:port) for outbound delivery.")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="PEM certificate chain (enables TLS; reloaded on SIGHUP).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key.")
@click.option("--user", help="Run as this user after binding the listeners (required as root).")
@click.option("--group", help="Run as this group (default: the user's primary group).")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log line format.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log level (default info).")
@click.option("--metrics", "metrics_listen", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics.")
@log_destination_options
@trusted_proxy_option
@click.option("--ipv6-prefix", metavar="BITS",
              help="Count IPv6 clients per network of this prefix for connection limits and "
                   "login throttling (default 64).")
@click.pass_context
def serve(ctx: click.Context, /, **opts: Any) -> None:
    """Run SMTP, submission, POP3, IMAP, the queue and window aging in one process.

    With no configuration at all it keeps everything in ./relaygate-data and
    listens on 127.0.0.1 (SMTP 2525, submission 2587, POP3 1110, IMAP 1143).
    Nothing relays until a POP3/IMAP login opens a window, SMTP AUTH
    authorizes a session, or a --rules line says so. SIGHUP reloads rules,
    TLS certificate and users; SIGTERM finishes transactions in flight, then
    exits 0.
    """
    def many(name: str) -> list[str] | None:
        values = opts.get(name) or ()
        return list(values) or None

    overrides: dict[str, Any] = {
        "config_file": opts["config_file"],
        "envdir": opts["envdir"],
        "data_dir": opts["data_dir"],
        "domains": many("domains"),
        "hostname": opts["hostname"],
        "store": opts["store"],
        "expiry": opts["expiry"],
        "rules_file": opts["rules_file"],
        "smtproutes_file": opts["smtproutes_file"],
        "tls.cert": opts["tls_cert"],
        "tls.key": opts["tls_key"],
        "user": opts["user"],
        "group": opts["group"],
        "log_format": opts["log_format"],
        "log_level": opts["log_level"],
        **log_destination(opts),
        "metrics.listen": opts["metrics_listen"],
        "ipv6_prefix": opts["ipv6_prefix"],
        "smtp.listen": many("smtp"),
        "smtp.submission": many("submission"),
        "smtp.smtps": many("smtps"),
        "pop3.listen": many("pop3"),
        "pop3.listen_tls": many("pop3s"),
        "imap.listen": many("imap"),
        "imap.listen_tls": many("imaps"),
        "policy.listen": many("policy"),
        "trusted_proxies": many("trusted_proxies"),
        "socketmap.listen": many("socketmap"),
    }
    settings = settings_from(ctx, **overrides)
    from relaygate.servers.serve import Server

    ctx.exit(Server(settings).run())


@click.command()
@click.option("--path", default="relaygate.toml", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the file ('-': stdout).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--reference", is_flag=True,
              help="Print the configuration reference table (Markdown) instead.")
def init(path: str, force: bool, reference: bool) -> None:
    """Write a commented relaygate.toml listing every setting with its default."""
    from relaygate.config_reference import render_markdown, render_toml

    if reference:
        click.echo(render_markdown(), nl=False)
        return
    text = render_toml()
    if path == "-":
        click.echo(text, nl=False)
        return
    target = Path(path)
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; use --force to overwrite it")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    click.echo(f"wrote {target}; edit it, then run: relaygate serve --config {target}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the relaygate processes of the data directory (serve, policyd, socketmap,
    watch-log...) with their listeners and configuration, open windows, the queue and
    recent errors.

    Works whether or not anything runs (it says which). Exit status: 0 when serve
    or another relaygate process of this data directory runs, 1 when none does.
    """
    from relaygate.errors import RelaygateError
    from relaygate.processes import adopt
    from relaygate.runtime import build_control, require_store
    from relaygate.status import any_running, build_report, render_text

    settings, _ = adopt(settings_from(ctx))
    now = time.time()
    data_dir: Path = settings.data_dir
    control = None
    open_error: str | None = None
    has_store = settings.store is not None or (data_dir / "grants.db").exists()
    if has_store and not settings.store_url.startswith("memory:"):
        try:
            require_store(settings)
            control = build_control(settings)
        except RelaygateError as exc:
            open_error = str(exc)
    elif not has_store:
        # Never create one here: an empty store would read as "nobody logged in".
        open_error = (f"no grant store: {(data_dir / 'grants.db').absolute()} does not exist "
                      "(give --data-dir, --store or --config)")
    queue = None
    if (data_dir / "queue").is_dir():
        try:
            from relaygate.mail.queue import Queue

            queue = Queue(data_dir / "queue")
        except (ImportError, OSError, RelaygateError):
            queue = None
    report = build_report(
        data_dir=data_dir, store_url=settings.store_url,
        list_grants=(lambda: control.list(now)) if control is not None else None,
        queue=queue, now=now)
    if open_error:
        report["store"]["error"] = open_error
        report["windows"] = None
    elif control is None and "windows" not in report:
        report["windows"] = {"count": 0, "by_source": {}}
    if control is not None:
        control.store.close()
    if as_json:
        click.echo(json.dumps(report, sort_keys=True, default=str))
    else:
        click.echo(render_text(report, now))
    ctx.exit(0 if any_running(report) else 1)
