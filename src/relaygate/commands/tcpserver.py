"""``relaygate tcpserver``: tcpserver's command line, relay decision in-process.

The options are ucspi-tcp tcpserver's, so a qmail run script changes only the
program name::

    exec envdir /etc/relay-ctrl relaygate tcpserver -v -R -H -l mail.example.org \\
        -x /etc/tcp.smtp.cdb -c 40 -u 7791 -g 2108 0 smtp qmail-smtpd

The store: ``--store``/``$RELAYGATE_STORE`` when given; otherwise, as the chain
programs do, the spool ``$RELAY_CTRL_DIR_FD`` or ``$RELAY_CTRL_DIR`` from the
environment; otherwise relaygate's default. ``$RELAY_CTRL_EXPIRY`` and
``$RELAY_CTRL_RELAYCLIENT`` apply unless ``--expiry``/``$RELAYGATE_EXPIRY``
and ``$RELAYGATE_RELAYCLIENT`` say otherwise.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from typing import Any

import click

from relaygate.cli import settings_from, trusted_proxy_option
from relaygate.errors import ConfigError


def _uint(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise click.UsageError(f"{what} must be a number (tcpserver takes numeric ids): {value!r}")
    return int(value)


def _control(ctx: click.Context, environ: dict[str, str]) -> Any:
    """RelayControl from Settings, with relay-ctrl's environment as the fallback."""
    from relaygate.control import RelayControl
    from relaygate.expiry import parse_expiry
    from relaygate.integrations.qmail.env import parse_uint
    from relaygate.rules import RuleSet
    from relaygate.stores import open_store
    from relaygate.stores.spool import SpoolStore

    root_cli = (ctx.find_root().obj or {}).get("cli", {})
    settings = settings_from(ctx)
    expiry = settings.expiry
    if root_cli.get("expiry") is None and "RELAYGATE_EXPIRY" not in environ \
            and "RELAY_CTRL_EXPIRY" in environ:
        try:
            expiry = float(parse_expiry(environ["RELAY_CTRL_EXPIRY"]))
        except ValueError as exc:
            raise ConfigError(f"expiry: {exc}", source="$RELAY_CTRL_EXPIRY",
                              value=environ["RELAY_CTRL_EXPIRY"]) from None
    relayclient = settings.relayclient
    if "RELAYGATE_RELAYCLIENT" not in environ and "RELAY_CTRL_RELAYCLIENT" in environ:
        relayclient = environ["RELAY_CTRL_RELAYCLIENT"]
    store: Any
    if settings.store:  # --store, $RELAYGATE_STORE, or RELAY_CTRL_DIR from --envdir
        store = open_store(settings.store, expiry=expiry)
    elif "RELAY_CTRL_DIR_FD" in environ:
        fd = parse_uint(environ["RELAY_CTRL_DIR_FD"])
        if fd is None:
            raise ConfigError("bad $RELAY_CTRL_DIR_FD", value=environ["RELAY_CTRL_DIR_FD"])
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        except OSError as exc:
            raise ConfigError(f"$RELAY_CTRL_DIR_FD is not an open descriptor ({exc.strerror})",
                              value=environ["RELAY_CTRL_DIR_FD"]) from None
        if not is_dir:
            raise ConfigError("$RELAY_CTRL_DIR_FD is not a directory",
                              value=environ["RELAY_CTRL_DIR_FD"])
        store = SpoolStore(environ.get("RELAY_CTRL_DIR") or f"(descriptor {fd})", expiry,
                           dir_fd=fd)
        # The decision is made here: the programs we run get no handle on the spool.
        os.set_inheritable(fd, False)
        del environ["RELAY_CTRL_DIR_FD"]
    elif "RELAY_CTRL_DIR" in environ:
        store = SpoolStore(environ["RELAY_CTRL_DIR"], expiry)
    else:
        if settings.store is None:
            from relaygate.runtime import make_data_dir

            make_data_dir(settings)
        store = open_store(settings.store_url, expiry=expiry)
    rules = RuleSet.load(settings.rules_file) if settings.rules_file else RuleSet.empty()
    return RelayControl(store, rules, expiry=expiry, relayclient=relayclient)


@click.command(
    context_settings={"help_option_names": ["--help"], "allow_interspersed_args": False},
)
@click.option("-c", "limit", type=click.IntRange(min=1), default=40, show_default=True,
              help="At most this many connections at once.")
@click.option("-x", "rules", metavar="FILE",
              help="Rules: a tcprules .cdb, or a rules text file (tcprules syntax, CIDR).")
@click.option("-X", "allow_missing", is_flag=True,
              help="Allow connections when the -x file does not exist.")
@click.option("-u", "uid", metavar="UID", help="Switch to this numeric user id after binding.")
@click.option("-g", "gid", metavar="GID", help="Switch to this numeric group id after binding.")
@click.option("-U", "from_env", is_flag=True, help="Same as -u $UID -g $GID (envuidgid).")
@click.option("-v", "verbose", is_flag=True, help="Verbose: log each connection.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: no messages, not even errors.")
@click.option("-Q", "normal", is_flag=True, help="Print errors and warnings (default).")
@click.option("-l", "local_host", metavar="NAME",
              help="$TCPLOCALHOST (no DNS look-up is done; unset without -l).")
@click.option("-b", "backlog", type=click.IntRange(min=1), default=20, show_default=True,
              help="Listen backlog.")
@click.option("-B", "banner", default="", help="Write this to each client first.")
@click.option("-D", "nodelay", is_flag=True, help="Set TCP_NODELAY.")
@click.option("-d", "delay", is_flag=True, help="Leave Nagle's algorithm on (default).")
@click.option("-1", "print_port", is_flag=True, help="Print the local port on stdout.")
@click.option("-H", "no_host", is_flag=True, help="No remote host name look-up (always).")
@click.option("-h", "host_lookup", is_flag=True, help="Accepted; host names are not looked up.")
@click.option("-R", "no_info", is_flag=True, help="No ident look-up (always).")
@click.option("-r", "info_lookup", is_flag=True, help="Accepted; ident is not looked up.")
@click.option("-p", "paranoid", is_flag=True, help="Accepted; implies -h, see there.")
@click.option("-P", "no_paranoid", is_flag=True, help="Not paranoid (always).")
@click.option("-o", "kill_options", is_flag=True, help="Accepted (IP options are left alone).")
@click.option("-O", "keep_options", is_flag=True, help="Accepted.")
@click.option("-t", "timeout", metavar="N", help="Accepted (ident time-out; no ident).")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="relaygate: processes accepting connections (default: 2 to 4 by CPUs; "
                   "the -c limit is split between them).")
@click.option("--no-relay", is_flag=True,
              help="Plain tcpserver: no relay decision (e.g. for a POP3 service).")
@trusted_proxy_option
@click.argument("host")
@click.argument("port")
@click.argument("program", nargs=-1, required=True)
@click.pass_context
def tcpserver(ctx: click.Context, /, **opts: Any) -> None:
    """Accept TCP connections and run PROGRAM for each, like ucspi-tcp's tcpserver,
    setting RELAYCLIENT in-process for clients with an open relay window.

    \b
    HOST  0 (every IPv4 address), :: (IPv6 and IPv4), an address, a name,
          or a comma-separated list of them.
    PORT  a number or a service name (smtp); 0 picks one (see -1).

    \b
    Each PROGRAM runs with the connection on descriptors 0 and 1 and:
      PROTO=TCP (TCP6 for IPv6 clients), TCPREMOTEIP, TCPREMOTEPORT,
      TCPLOCALIP, TCPLOCALPORT, TCPLOCALHOST (-l), the matching rule's
      variables, and, when the client may relay and no rule set it,
      RELAYCLIENT plus the USER and DOMAIN whose login opened the window.

    A rule with deny closes the connection. If the grant store cannot be
    read, RELAYCLIENT is not set (fail closed) and a warning is logged; the
    program still runs.

    Exit status: 0 after SIGTERM/SIGINT; 111 on a start-up error (bad
    option value, address in use, unknown program); 2 on a usage error.
    """
    from relaygate.integrations.qmail.env import undo_locale_coercion
    from relaygate.integrations.qmail.tcpserver import TcpServer, TcpServerOptions

    environ = dict(os.environ)
    undo_locale_coercion(environ)  # pass on the locale we were given, not CPython's choice
    uid = _uint(opts["uid"], "-u")
    gid = _uint(opts["gid"], "-g")
    if opts["from_env"]:
        uid = _uint(environ.get("UID"), "$UID") if uid is None else uid
        gid = _uint(environ.get("GID"), "$GID") if gid is None else gid
        if uid is None or gid is None:
            raise click.UsageError("-U needs $UID and $GID (run under envuidgid)")
    verbosity = 2 if opts["verbose"] else 0 if opts["quiet"] else 1
    from relaygate.networks import Networks

    proxies = settings_from(ctx, trusted_proxies=list(opts["trusted_proxies"]) or None)
    options = TcpServerOptions(
        host=opts["host"], port=opts["port"], argv=list(opts["program"]),
        limit=opts["limit"], backlog=opts["backlog"], rules=opts["rules"],
        allow_missing_rules=opts["allow_missing"], uid=uid, gid=gid, verbosity=verbosity,
        local_host=opts["local_host"], banner=os.fsencode(opts["banner"]),
        nodelay=opts["nodelay"], print_port=opts["print_port"], relay=not opts["no_relay"],
        trusted_proxies=Networks(proxies.trusted_proxies),
        proxy_timeout=proxies.proxy_timeout,
    )
    control = None if opts["no_relay"] else _control(ctx, environ)
    server = TcpServer(options, control=control, environ=environ)
    if verbosity >= 1 and (opts["host_lookup"] or opts["paranoid"] or opts["info_lookup"]):
        server.log(1, "warning: -h, -p and -r are accepted but no DNS or ident look-ups are done")
    ports = server.bind()
    server.drop_privileges()
    if options.print_port:
        click.echo(" ".join(str(p) for p in ports))
        sys.stdout.flush()

    def stop(signum: int, frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    from relaygate.integrations.qmail.tcpserver import DEFAULT_WORKERS

    server.serve(opts["workers"] or DEFAULT_WORKERS)
