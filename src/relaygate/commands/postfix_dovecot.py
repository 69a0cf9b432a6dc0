"""MTA and Dovecot commands: ``policyd``, ``socketmap``, ``dovecot-postlogin``,
``watch-log``, ``doctor``.

``policyd`` runs the Postfix policy service alone (``serve`` runs it too when
``policy.listen`` is set); ``socketmap`` the socketmap service for Sendmail and
Postfix (``serve`` with ``socketmap.listen``); ``dovecot-postlogin`` is Dovecot's post-login hook;
``watch-log`` opens windows from POP3/IMAP login lines in logs; ``doctor
postfix`` checks that Postfix asks the policy service at the right place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from relaygate.cli import EXIT_TEMPFAIL, settings_from, trusted_proxy_option

_LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"])

if TYPE_CHECKING:
    from relaygate.protocols.loglines import LoginMatcher

log = logging.getLogger("relaygate.commands")


@click.command()
@click.option("--listen", "-l", multiple=True, metavar="HOST:PORT|unix:PATH",
              help="Listener, repeatable: 127.0.0.1:10040, [::1]:10040, "
                   "unix:/var/spool/postfix/private/relaygate (default: policy.listen from "
                   "the configuration, else 127.0.0.1:10040).")
@click.option("--socket-mode", metavar="OCTAL",
              help="Permissions of UNIX sockets (default 0660).")
@click.option("--socket-group", metavar="GROUP",
              help="Group of UNIX sockets (e.g. postfix, so smtpd can connect).")
@click.option("--threads", type=click.IntRange(min=1),
              help="Store lookup threads (default 1; more help a remote Redis).")
@click.option("--log-level", type=_LOG_LEVELS, help="Log level (default info; debug logs "
                                                    "every DUNNO).")
@trusted_proxy_option
@click.pass_context
def policyd(ctx: click.Context, listen: tuple[str, ...], socket_mode: str | None,
            socket_group: str | None, threads: int | None, log_level: str | None,
            trusted_proxies: tuple[str, ...]) -> None:
    """Run the Postfix policy service (check_policy_service).

    Answers action=OK when the client address may relay (a static rule or an
    open POP/IMAP window; the reason is logged) and action=DUNNO otherwise,
    also when the store is unreachable (Postfix's reject_unauth_destination
    then refuses the relay). Put it before reject_unauth_destination:

    \b
      smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated,
          check_policy_service inet:127.0.0.1:10040, reject_unauth_destination

    Stops on SIGTERM/SIGINT (UNIX sockets are removed; answers in flight get
    shutdown_grace seconds), re-reads the rules on SIGHUP. Exit 111 when a
    listener cannot be bound or the store cannot be opened.
    """
    settings = settings_from(ctx, **{
        "policy.listen": list(listen) or None,
        "policy.socket_mode": socket_mode,
        "policy.socket_group": socket_group,
        "policy.threads": threads,
        "log_level": log_level,
        "trusted_proxies": list(trusted_proxies) or None,
    })
    if not settings.policy.listen:
        settings = settings.replace(
            policy=dataclasses.replace(settings.policy, listen=("127.0.0.1:10040",)))
    from relaygate.commands._single import run_services
    from relaygate.context import Context
    from relaygate.log import setup_logging
    from relaygate.metrics import Metrics
    from relaygate.runtime import build_control
    from relaygate.servers.policy import make_service

    setup_logging(settings.log_format, settings.log_level)
    control = build_control(settings)
    context = Context(settings, control, Metrics())
    try:
        rc = asyncio.run(run_services("policyd", context, [make_service(context)],
                                      announce=lambda lines: None))
    finally:
        control.store.close()
    ctx.exit(rc)


@click.command()
@click.option("--listen", "-l", multiple=True, metavar="HOST:PORT|unix:PATH",
              help="Listener, repeatable: 127.0.0.1:10041, [::1]:10041, "
                   "unix:/run/relaygate/socketmap (default: socketmap.listen from the "
                   "configuration, else 127.0.0.1:10041).")
@click.option("--value", metavar="TEXT",
              help="Value answered with OK for an address that may relay (default OK).")
@click.option("--socket-mode", metavar="OCTAL",
              help="Permissions of UNIX sockets (default 0660).")
@click.option("--socket-group", metavar="GROUP",
              help="Group of UNIX sockets (e.g. smmsp or postfix, so the MTA can connect).")
@click.option("--threads", type=click.IntRange(min=1),
              help="Store lookup threads (default 1; more help a remote Redis).")
@click.option("--log-level", type=_LOG_LEVELS, help="Log level (default info; debug logs "
                                                    "every NOTFOUND).")
@click.pass_context
def socketmap(ctx: click.Context, listen: tuple[str, ...], value: str | None,
              socket_mode: str | None, socket_group: str | None, threads: int | None,
              log_level: str | None) -> None:
    """Run the socketmap service for Sendmail and Postfix.

    The key of each lookup is a client address (192.0.2.1, IPv6:2001:db8::1,
    optionally tagged: POP:192.0.2.1); any map name is accepted. Answers
    OK VALUE when the address may relay (a static rule or an open POP/IMAP
    window), NOTFOUND otherwise, TEMP when the store is unreachable (never
    OK). Sendmail: see deploy/sendmail/; Postfix:

    \b
      smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated,
          check_client_access socketmap:inet:127.0.0.1:10041:relaygate,
          reject_unauth_destination

    Stops on SIGTERM/SIGINT (UNIX sockets are removed; lookups in flight get
    shutdown_grace seconds), re-reads the rules on SIGHUP. Exit 111 when a
    listener cannot be bound or the store cannot be opened.
    """
    settings = settings_from(ctx, **{
        "socketmap.listen": list(listen) or None,
        "socketmap.value": value,
        "socketmap.socket_mode": socket_mode,
        "socketmap.socket_group": socket_group,
        "socketmap.threads": threads,
        "log_level": log_level,
    })
    if not settings.socketmap.listen:
        settings = settings.replace(
            socketmap=dataclasses.replace(settings.socketmap, listen=("127.0.0.1:10041",)))
    from relaygate.commands._single import run_services
    from relaygate.context import Context
    from relaygate.errors import ConfigError
    from relaygate.log import setup_logging
    from relaygate.metrics import Metrics
    from relaygate.runtime import build_control
    from relaygate.servers.socketmap import make_service

    setup_logging(settings.log_format, settings.log_level)
    control = build_control(settings)
    try:
        context = Context(settings, control, Metrics())
        try:
            service = make_service(context)
        except ConfigError as exc:
            click.echo(f"relaygate socketmap: configuration error: {exc}", err=True)
            ctx.exit(EXIT_TEMPFAIL)
        rc = asyncio.run(run_services("socketmap", context, [service],
                                      announce=lambda lines: None))
    finally:
        control.store.close()
    ctx.exit(rc)


@click.command("dovecot-postlogin", context_settings={
    "ignore_unknown_options": True, "allow_interspersed_args": False,
    "help_option_names": ["-h", "--help"]})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def dovecot_postlogin(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Dovecot post-login hook: open the relay window for $IP, then exec PROGRAM.

    \b
    relaygate dovecot-postlogin [--store URL] [--expiry SECONDS] [--config FILE]
                                [--data-dir DIR] [--timeout SECONDS] [--verbose]
                                [--] PROGRAM [ARGS...]

    Dovecot's script-login runs it after each successful login with $USER and
    $IP set and its own program as the last argument. Dovecot gives
    post-login scripts a cleaned environment, so name the store with --store
    (or --config) in dovecot.conf:

    \b
      service pop3-postlogin {
        executable = script-login /usr/local/bin/relaygate dovecot-postlogin \\
                     --store sqlite:///var/lib/relaygate/grants.db
        ...

    A failure to record the window is logged (Dovecot logs the script's
    stderr) and the login goes on. Exit 111 only when PROGRAM cannot be
    executed. Written first on the command line (`relaygate dovecot-postlogin
    --store URL PROGRAM`), the hook skips the CLI's start-up entirely.
    """
    from relaygate.integrations.dovecot import main

    root = ctx.find_root().obj or {}
    cli = root.get("cli", {})
    main(list(args), os.environ, defaults={
        "store": cli.get("store"), "expiry": cli.get("expiry"),
        "data_dir": cli.get("data_dir"), "config": root.get("config_file")})


@click.command("watch-log")
@click.argument("files", nargs=-1, metavar="FILE...")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "syslog", "dovecot-log", "qpopper-log", "apple-log",
                                 "journal-export"]),
              help="Line format (auto: journald export if the stream starts like it, else "
                   "each line is read as syslog, Dovecot's, Qpopper's or Apple's own log).")
@click.option("--pattern", "patterns", multiple=True, metavar="NAME=REGEX",
              help="Extra login pattern, repeatable: a regex with a named group 'ip' (and "
                   "optionally 'user'), full-matched against 'TAG[PID]: MESSAGE'.")
@click.option("--builtin", "builtins", multiple=True, metavar="NAME",
              help="Use only these built-in pattern families (dovecot, dovecot-log, courier, "
                   "uw, qpopper, cyrus, gnu-pop3d, vchkpw, vm-pop3d, popa3d, perdition, "
                   "solid-pop3d, teapop, cucipop, apple; 'none' for custom patterns only). "
                   "Default: all.")
@click.option("--from-start", is_flag=True,
              help="Read files from their start (default: only lines written from now on).")
@click.option("--once", is_flag=True,
              help="Read the files from their start (stdin to its end) once, then exit 0: "
                   "catch up after downtime, or test patterns with --dry-run.")
@click.option("--dry-run", is_flag=True,
              help="Print the logins found on stdout; open no window.")
@click.option("--test", "test_file", metavar="FILE",
              help="Pattern tester: print for each line of FILE ('-' = stdin) which pattern "
                   "matched, the address and user taken, and why near misses did not match; "
                   "open no window.")
@click.option("--max-session", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Longest a session never logged out keeps its window open (servers that "
                   "log logouts; default 43200 = 12 h; 0 = a login's window just expires).")
@click.option("--interval", type=click.FloatRange(min=0.01),
              help="Seconds between polls of the files (default 0.25).")
@click.option("--log-level", type=_LOG_LEVELS, help="Log level (default info).")
@click.pass_context
def watch_log(ctx: click.Context, files: tuple[str, ...], fmt: str, patterns: tuple[str, ...],
              builtins: tuple[str, ...], from_start: bool, once: bool, dry_run: bool,
              test_file: str | None, max_session: float | None, interval: float | None,
              log_level: str | None) -> None:
    """Open relay windows from POP3/IMAP login lines in FILE... ('-' = stdin).

    Follows files across rotation (rename and truncate), like tail -F. Reads
    syslog files (/var/log/mail.log), Dovecot's own log_path file, Qpopper's
    and Apple Mail Server's own logs, or journald's export format:

    \b
      journalctl -o export -f _SYSTEMD_UNIT=dovecot.service | relaygate watch-log -

    Built-in patterns (docs/log-watcher.md): Dovecot (also proxy/director),
    Courier, UW, Qpopper, Cyrus, GNU pop3d, vpopmail's vchkpw, vm-pop3d,
    popa3d, Perdition, solid-pop3d, teapop, cucipop, Apple Mail Server. Logins
    logged on two lines (connect, then success of the same pid) are joined;
    where a server logs logouts the window stays open until the logout. A
    line counts only when its daemon tag and its whole shape match (a client
    can put text of its choice in other daemons' lines). Check a pattern on a
    real log with --test FILE. Exit 111 when stdin ends.
    """
    settings = settings_from(ctx, **{
        "log_level": log_level,
        "logwatch.interval": interval,
        "logwatch.max_session": max_session,
    })
    from relaygate.errors import ConfigError
    from relaygate.integrations.logwatch import LogWatcher, window_opener
    from relaygate.log import setup_logging
    from relaygate.protocols.loglines import LoginEvent, LoginMatcher

    if test_file is None and not files:
        raise click.UsageError("give FILE... to watch (or --test FILE)")
    if test_file is not None and files:
        raise click.UsageError("--test FILE reads only FILE: give no other FILE")
    if test_file is not None and fmt == "journal-export":
        raise click.UsageError("--test reads text lines: feed it journalctl -o short-iso")
    setup_logging(settings.log_format, settings.log_level)
    chosen = builtins or settings.logwatch.builtins
    if "none" in chosen:
        chosen = ()
    try:
        matcher = LoginMatcher(chosen, (*settings.logwatch.patterns, *patterns))
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    if test_file is not None:
        _run_tester(test_file, matcher, fmt)
        return
    handler: Callable[[LoginEvent], None]
    if dry_run:
        def show(ev: LoginEvent) -> None:
            click.echo(f"{ev.ip} user={ev.user or '-'} service={ev.service} "
                       f"pattern={ev.pattern}{' refresh' if ev.refresh else ''}")
        handler, store = show, None
    else:
        from relaygate.runtime import build_control

        control = build_control(settings)
        store = control.store
        handler = window_opener(control)
    watcher = LogWatcher(list(files), matcher, handler, fmt=fmt,
                         interval=settings.logwatch.interval, from_start=from_start or once,
                         refresh_every=settings.expiry / 2,
                         max_session=settings.logwatch.max_session)
    try:
        if once:
            rc = watcher.run_once()
        else:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, lambda *_: watcher.stop())
                signal.signal(signal.SIGINT, lambda *_: watcher.stop())
            log.info("watching %s", ", ".join(files))
            rc = watcher.run()
    finally:
        if store is not None:
            store.close()
    ctx.exit(rc)


def _run_tester(path: str, matcher: LoginMatcher, fmt: str) -> None:
    """``watch-log --test``: explain each line of ``path`` ('-' = stdin) on stdout."""
    import sys

    from relaygate.integrations.logwatch import run_tester

    if path == "-":
        fd = sys.stdin.fileno()
        run_tester(lambda: os.read(fd, 65536), matcher, sys.stdout, fmt=fmt)
        return
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise click.FileError(path, exc.strerror) from None
    with f:
        run_tester(lambda: f.read(65536), matcher, sys.stdout, fmt=fmt)


@click.group()
def doctor() -> None:
    """Check how relaygate fits into other mail software."""


@doctor.command("postfix")
@click.option("-c", "--config-dir", type=click.Path(file_okay=False),
              help="Postfix configuration directory (postconf -c; default Postfix's own).")
@click.option("--policy", "policies", multiple=True, metavar="ENDPOINT",
              help="relaygate's policy endpoint as in main.cf (inet:127.0.0.1:10040, "
                   "unix:private/relaygate), repeatable. Default: policy.listen from the "
                   "configuration, else 127.0.0.1:10040.")
@click.option("--probe", is_flag=True, help="Also send a test request to the policy service.")
@click.option("--postconf", default="postconf", show_default=True, help="postconf program.")
@click.pass_context
def doctor_postfix(ctx: click.Context, config_dir: str | None, policies: tuple[str, ...],
                   probe: bool, postconf: str) -> None:
    """Check where Postfix asks relaygate's policy service.

    Reads smtpd_relay_restrictions and smtpd_recipient_restrictions with
    postconf (and master.cf overrides) and reports a policy that is missing,
    sits after reject_unauth_destination/defer_unauth_destination, or is
    shadowed by the default relay restrictions. Exit 0 when all is well, 1
    when there is a problem, 111 when postconf cannot be run.
    """
    from relaygate.integrations.postfix_doctor import DoctorError, diagnose

    expected = list(policies)
    if not expected:
        expected = list(settings_from(ctx).policy.listen) or ["127.0.0.1:10040"]
    try:
        report = diagnose(config_dir=config_dir, expected=expected, postconf=postconf,
                          do_probe=probe)
    except DoctorError as exc:
        click.echo(f"relaygate doctor postfix: {exc}", err=True)
        ctx.exit(EXIT_TEMPFAIL)
    where = config_dir or "Postfix's default configuration"
    click.echo(f"Postfix {report.version}, {where}")
    for name in ("smtpd_relay_restrictions", "smtpd_recipient_restrictions", "mynetworks"):
        click.echo(f"  {name} = {report.values.get(name, '')}")
    for f in report.findings:
        click.echo(f"{f.level}: {f.message}")
    if report.problems:
        click.echo(f"{len(report.problems)} problem(s); see docs/postfix-dovecot.md", err=True)
        ctx.exit(1)
    warnings = sum(1 for f in report.findings if f.level == "warning")
    click.echo("relaygate's policy is in place"
               + (f" ({warnings} warning(s) above)" if warnings else ""))


@doctor.command("dovecot")
@click.option("-c", "--config-file", type=click.Path(dir_okay=False),
              help="Dovecot configuration file (doveconf -c; default Dovecot's own).")
@click.option("--doveconf", default="doveconf", show_default=True, help="doveconf program.")
@click.pass_context
def doctor_dovecot(ctx: click.Context, config_file: str | None, doveconf: str) -> None:
    """Check that Dovecot's POP3/IMAP logins run relaygate's post-login hook.

    Reads the services with doveconf and reports, for each protocol Dovecot
    serves: a missing or foreign post-login service; a hook program the
    service's user cannot execute (a virtualenv under /root: Dovecot then
    refuses every login); a store (--store, --data-dir or --config on the
    hook's command line) that user cannot write. The last two are tested as
    that user, so run it as root. Exit 0 when all is well, 1 when there is a
    problem, 111 when doveconf cannot be run.
    """
    from relaygate.integrations.dovecot_doctor import DoctorError, diagnose

    try:
        report = diagnose(config_file=config_file, doveconf=doveconf)
    except DoctorError as exc:
        click.echo(f"relaygate doctor dovecot: {exc}", err=True)
        ctx.exit(EXIT_TEMPFAIL)
        return
    where = config_file or "Dovecot's default configuration"
    click.echo(f"Dovecot {report.version}, {where}")
    click.echo(f"  protocols = {' '.join(report.protocols)}")
    for name, svc in report.hooks.items():
        click.echo(f"  service {name}: executable = {svc.get('executable', '')}; "
                   f"user = {svc.get('user', '')}; extra_groups = {svc.get('extra_groups', '')}")
    for f in report.findings:
        click.echo(f"{f.level}: {f.message}")
    if report.problems:
        click.echo(f"{len(report.problems)} problem(s); see docs/postfix-dovecot.md", err=True)
        ctx.exit(1)
    click.echo("Dovecot's logins open relay windows")


@doctor.command("exim")
@click.option("--exim", "program", metavar="PROGRAM",
              help="Exim program (default exim4 if installed, else exim).")
@click.option("--config", "config_file", metavar="FILE",
              help="Check this configuration (exim -C FILE) instead of the running one.")
@click.option("--address", default="192.0.2.53", show_default=True, metavar="IP",
              help="Address given a 60-second window for the test session.")
@click.option("--stranger", default="192.0.2.54", show_default=True, metavar="IP",
              help="Address without a window for the test session.")
@click.option("--no-session", is_flag=True, help="Skip the test session (exim -bh).")
@click.pass_context
def doctor_exim(ctx: click.Context, program: str | None, config_file: str | None,
                address: str, stranger: str, no_session: bool) -> None:
    """Check that Exim asks relaygate before its relay check.

    Reads Exim's configuration (exim -bV, exim -bP) and reports whether the
    RCPT ACL asks relaygate's policy service (deploy/exim/relaygate-rcpt.conf)
    before the relay check, whether the socket it names is reachable by the
    Exim user, and whether a test session (exim -bh) from an address with an
    open window may relay while a stranger may not. Exit 0 when all is well,
    1 when there is a problem, 111 when Exim cannot be run.
    """
    import shutil

    from relaygate.errors import InvalidAddress
    from relaygate.integrations.exim_doctor import Exim, EximDoctorError, diagnose, window_session

    exim_program = program or shutil.which("exim4") or shutil.which("exim") or "exim4"
    exim = Exim(exim_program, config_file)
    session = None
    control = None
    if not no_session:
        from relaygate.runtime import build_control

        control = build_control(settings_from(ctx))
        try:
            session = window_session(control, address, stranger)
        except InvalidAddress as exc:
            raise click.BadParameter(str(exc)) from None
    try:
        try:
            report = diagnose(exim, session=session)
        except InvalidAddress as exc:
            raise click.BadParameter(str(exc)) from None
        except EximDoctorError as exc:
            click.echo(f"relaygate doctor exim: {exc}", err=True)
            ctx.exit(EXIT_TEMPFAIL)
    finally:
        if control is not None:
            control.store.close()
    click.echo(f"Exim {report.version}, {report.config_file}, acl_smtp_rcpt = "
               f"{report.acl or '(unset)'}, user {report.user}")
    for level, message in report.findings:
        click.echo(f"{level}: {message}")
    if report.problems:
        click.echo(f"{len(report.problems)} problem(s); see docs/exim.md", err=True)
        ctx.exit(1)
    click.echo("relaygate is asked where Exim decides relaying")
