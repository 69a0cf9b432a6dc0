"""The ``relaygate`` command.

Subcommands live in ``relaygate.commands.*`` and are imported only when run
(a lazy click group), so ``relaygate check`` does not pay for the SMTP server.
Group options (``--store``, ``--data-dir``, ``--config``, ``--envdir``,
``--expiry``, ``--rules``, ``--log-format``, ``--log-file``, ``--syslog``)
apply to every subcommand.

Exit codes: 0 success; 1 a negative answer (``check``: deny); 2 usage error;
111 temporary failure (store unreachable, configuration error), as qmail does.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NoReturn

import click

from relaygate.errors import ConfigError, RelaygateError, StoreError

#: subcommand name -> "module:attribute" (imported on first use)
COMMANDS: dict[str, str] = {
    "allow": "relaygate.commands.admin:allow",
    "check": "relaygate.commands.admin:check",
    "revoke": "relaygate.commands.admin:revoke",
    "list": "relaygate.commands.admin:list_",
    "age": "relaygate.commands.admin:age",
    "rules": "relaygate.commands.admin:rules",
    "serve": "relaygate.commands.serve:serve",
    "init": "relaygate.commands.serve:init",
    "status": "relaygate.commands.serve:status",
    "policyd": "relaygate.commands.postfix_dovecot:policyd",
    "socketmap": "relaygate.commands.postfix_dovecot:socketmap",
    "dovecot-postlogin": "relaygate.commands.postfix_dovecot:dovecot_postlogin",
    "watch-log": "relaygate.commands.postfix_dovecot:watch_log",
    "doctor": "relaygate.commands.postfix_dovecot:doctor",
    "smtpd": "relaygate.commands.smtpd:smtpd",
    "queue": "relaygate.commands.queue:queue",
    "report": "relaygate.commands.report:report",
    "users": "relaygate.commands.users:users",
    "pop3d": "relaygate.commands.pop3d:pop3d",
    "imapd": "relaygate.commands.imapd:imapd",
    "tcpserver": "relaygate.commands.tcpserver:tcpserver",
}

EXIT_TEMPFAIL = 111


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML configuration file (also $RELAYGATE_CONFIG).")
@click.option("--envdir", type=click.Path(file_okay=False),
              help="envdir-style directory with RELAY_CTRL_* variables (e.g. /etc/relay-ctrl).")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Data directory (default ./relaygate-data; also $RELAYGATE_DATA_DIR).")
@click.option("--store", metavar="URL",
              help="Grant store: sqlite:///PATH, spool:///DIR, redis://HOST:PORT/DB, "
                   "redis+sentinel://HOST:PORT,.../SERVICE, redis+cluster://HOST:PORT,..., "
                   "memory: (also $RELAYGATE_STORE; default SQLite in the data directory).")
@click.option("--expiry", type=str, metavar="SECONDS",
              help="How long a login keeps the relay window open (default 900).")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False),
              help="Static rules file (tcprules syntax and CIDR lines).")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log line format.")
@click.option("--log-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Long-running commands (serve, policyd, smtpd, watch-log...) log to FILE "
                   "instead of stderr, each line with an ISO time; reopened on SIGHUP and "
                   "when logrotate moves it (also $RELAYGATE_LOG_FILE).")
@click.option("--syslog", is_flag=True, default=None,
              help="Long-running commands log to syslog (/dev/log, facility mail) instead "
                   "of stderr.")
@click.version_option(package_name="relaygate")
@click.pass_context
def main(ctx: click.Context, /, **options: Any) -> None:
    """relaygate: POP-before-SMTP and IMAP-before-SMTP relay control.

    A successful POP3 or IMAP login opens a relay window for the client's
    address; the SMTP server lets that address relay while the window is open.
    """
    ctx.ensure_object(dict)
    ctx.obj["cli"] = {k: v for k, v in options.items() if k != "config_file" and k != "envdir"}
    ctx.obj["config_file"] = options.get("config_file")
    ctx.obj["envdir"] = options.get("envdir")


def run() -> None:
    """Console-script entry point with relaygate's exit codes for typed errors."""
    try:
        rc = main.main(standalone_mode=False, prog_name="relaygate")
        if isinstance(rc, int):
            sys.exit(rc)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except ConfigError as exc:
        _fatal(f"configuration error: {exc}")
    except StoreError as exc:
        _fatal(f"grant store unreachable: {exc}")
    except RelaygateError as exc:
        _fatal(str(exc))


def _fatal(message: str) -> NoReturn:
    """Exit 111 on a typed error: stderr, and the log file or syslog when one is in use."""
    from relaygate.log import record_fatal

    click.echo(f"relaygate: {message}", err=True)
    record_fatal(message)
    sys.exit(EXIT_TEMPFAIL)


def trusted_proxy_option(fn: Any) -> Any:
    """``--trusted-proxy CIDR`` (repeatable), for every command that runs a listener."""
    return click.option(
        "--trusted-proxy", "trusted_proxies", multiple=True, metavar="CIDR",
        help="Load balancer (address or network) whose PROXY protocol header (v1 or v2) "
             "names the client; its connections must start with one. Repeatable "
             "(TOML trusted_proxies).")(fn)


def log_destination_options(fn: Any) -> Any:
    """``--log-file FILE`` and ``--syslog`` on a server command too (the same as the
    group options before the subcommand, which admins do not always find)."""
    fn = click.option("--syslog", is_flag=True, default=None,
                      help="Log to syslog (/dev/log, facility mail) instead of stderr.")(fn)
    return click.option("--log-file", type=click.Path(dir_okay=False), metavar="FILE",
                        help="Log to FILE instead of stderr, each line with an ISO time; "
                             "reopened on SIGHUP and when logrotate moves it.")(fn)


def log_destination(opts: dict[str, Any]) -> dict[str, Any]:
    """The settings overrides of :func:`log_destination_options`."""
    return {"log_file": opts.get("log_file"), "syslog": opts.get("syslog")}


def settings_from(ctx: click.Context, **overrides: Any) -> Any:
    """Build Settings from the group options, a command's own options and the environment."""
    from relaygate.config import load_settings

    root = ctx.find_root()
    obj = root.obj or {}
    cli = dict(obj.get("cli", {}))
    config_file = overrides.pop("config_file", None) or obj.get("config_file")
    envdir = overrides.pop("envdir", None) or obj.get("envdir")
    cli.update({k: v for k, v in overrides.items() if v is not None})
    return load_settings(cli=cli, environ=os.environ, config_file=config_file, envdir=envdir)


if __name__ == "__main__":  # pragma: no cover
    run()
