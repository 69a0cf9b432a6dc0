"""relay-ctrl-check: set $RELAYCLIENT for a client whose relay window is open.

Theory of operation
-------------------
``tcpserver ... relay-ctrl-check qmail-smtpd`` runs this once per SMTP
connection, before qmail-smtpd. As relay-ctrl 3.x does:

1. ``$RELAYCLIENT`` already set (a tcprules line): nothing to look up.
2. Otherwise look ``$TCPREMOTEIP`` up in the store (the spool directory
   ``$RELAY_CTRL_DIR`` or the descriptor ``$RELAY_CTRL_DIR_FD``; a file is
   live while ``mtime + $RELAY_CTRL_EXPIRY >= now``, an expired one is
   removed). When live, set ``RELAYCLIENT=$RELAY_CTRL_RELAYCLIENT`` (default
   empty: plain relaying, see qmail-smtpd(8)) and export the file's ``USER``
   and ``DOMAIN``.
3. ``execvp`` the rest of the arguments with every descriptor kept.

Deliberately better than the original:

- ``$TCPREMOTEIP`` may be IPv6 (``::ffff:a.b.c.d`` from tcpserver/Courier is
  folded to IPv4, plain IPv6 is looked up under its RFC 5952 name), and a
  value that is not an address (``../x``) is refused before any file is opened;
- only ``USER`` and ``DOMAIN`` are exported; any other name in the file
  (``LD_PRELOAD``, ``QMAILQUEUE``, ``RELAYCLIENT``...) is ignored and logged;
- a store that cannot be read means no ``$RELAYCLIENT`` (fail closed) and a
  warning, and qmail-smtpd still runs, so mail to local users still arrives;
  so does a ``$RELAY_CTRL_EXPIRY`` that is not a plain positive integer
  (relay-ctrl read ``abc`` as 900 and ``1e3`` as 1; see :mod:`relaygate.expiry`);
- ``$RELAYGATE_STORE`` selects SQLite or Redis (a cluster sharing its windows).

Start-up budget: this runs per connection, so it imports only ``os``, ``sys``
and the small relaygate modules the lookup needs (no ``typing``, ``re``,
``logging``, ``socket``, ``ipaddress``, ``dataclasses``); ``bench/chain.py``
measures it against a bare ``python -I -S``.
"""

from __future__ import annotations

import os
import sys
import time

from relaygate.addresses import parse_ip
from relaygate.errors import ConfigError, InvalidAddress, StoreError
from relaygate.integrations.qmail.env import (
    EXIT_USAGE,
    EXPORTED,
    Messages,
    StoreChoice,
    close_dir_fd,
    exec_next,
    expiry_from_env,
    open_store_from_env,
    shown,
    wants_help,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import MutableMapping
    from typing import NoReturn

PROGRAM = "relay-ctrl-check"

#: relay-ctrl-check reads one buffer of this size from a spool file.
MAX_SPOOL_READ = 8192


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv if argv is None else argv
    wants_help(args, PROGRAM)
    say = Messages(PROGRAM)
    if len(args) < 2:
        say.die(EXIT_USAGE, "usage: relay-ctrl-check program [arguments]")
    env = os.environ
    log_ips = "RELAY_CTRL_LOG_IPS" in env
    if "RELAYCLIENT" in env:
        if log_ips:
            say.msg("$RELAYCLIENT already set, not checking IP")
    else:
        try:
            check(env, say, log_ips, "RELAY_CTRL_LOG_ENV" in env)
        except Exception as exc:  # whatever went wrong, qmail-smtpd must still run
            env.pop("RELAYCLIENT", None)  # fail closed
            say.warn(f"relay check failed, not setting $RELAYCLIENT: {shown(repr(exc))}")
    exec_next(args[1:], say)


def check(env: MutableMapping[str, str], say: Messages, log_ips: bool, log_env: bool) -> None:
    """Look the client up and set RELAYCLIENT/USER/DOMAIN in ``env`` when it may relay."""
    raw = env.get("TCPREMOTEIP")
    if raw is None:
        say.warn("$TCPREMOTEIP not set, not checking IP")
        return
    try:
        ip = parse_ip(raw)
    except InvalidAddress:
        say.warn(f"$TCPREMOTEIP '{shown(raw)}' is not an IP address, not checking IP")
        return
    try:
        expiry = expiry_from_env(env)
    except ValueError as exc:
        # A configuration error: fail closed for relaying, but qmail-smtpd still runs.
        say.warn(f"{exc}: every relay window counts as closed, not setting $RELAYCLIENT")
        return
    choice: StoreChoice | None = None
    try:
        try:
            choice = open_store_from_env(env, expiry, say)
            if choice is None:
                return
            existed = log_ips and choice.is_spool and _spool_entry_exists(choice, ip)
            grant = choice.store.get(ip, time.time())
        except (StoreError, ConfigError) as exc:
            # Fail closed: no RELAYCLIENT, but qmail-smtpd still runs (local mail arrives).
            say.warn(f"grant store unusable, not setting $RELAYCLIENT for {ip}: {exc}")
            return
        if grant is None:
            if log_ips:
                say.msg(f"Expired IP {ip} found, removing" if existed else f"IP {ip} not found")
            return
        if log_ips:
            say.msg(f"IP {ip} found, setting $RELAYCLIENT")
        env["RELAYCLIENT"] = env.get("RELAY_CTRL_RELAYCLIENT", "")
        for name, value in (("USER", grant.user), ("DOMAIN", grant.domain)):
            if value is not None:
                env[name] = value
                if log_env:
                    say.msg(f"Setting {name}={shown(value)}")
        if choice.is_spool:
            _report_ignored(choice, ip, say)
    finally:
        if choice is not None:
            if not choice.is_spool:
                choice.store.close()
            close_dir_fd(choice)


def _spool_name(choice: StoreChoice, ip: str) -> tuple[str, int | None]:
    if choice.dir_fd is not None:
        return ip, choice.dir_fd
    return os.path.join(choice.spool_path or ".", ip), None


def _spool_entry_exists(choice: StoreChoice, ip: str) -> bool:
    """Only for $RELAY_CTRL_LOG_IPS: tells "expired" from "not found" in the message."""
    name, dir_fd = _spool_name(choice, ip)
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (OSError, ValueError):
        return False
    return True


def _report_ignored(choice: StoreChoice, ip: str, say: Messages) -> None:
    """Log the names in a spool file that relay-ctrl would have exported and we do not.

    A planted ``LD_PRELOAD=`` or ``QMAILQUEUE=`` is an attack on the SMTP server;
    the file is read once more (a few microseconds) only to say so.
    """
    name, dir_fd = _spool_name(choice, ip)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return
    try:
        data = os.read(fd, MAX_SPOOL_READ)
    except OSError:
        return
    finally:
        os.close(fd)
    ignored = []
    entries = data.split(b"\0")
    entries.pop()  # an unterminated tail is not an entry for relay-ctrl either
    for entry in entries:
        key, sep, _ = entry.partition(b"=")
        if sep and key.decode("ascii", "replace") not in EXPORTED:
            ignored.append(shown(key))
    if ignored:
        say.warn(
            f"spool file for {ip} also sets {', '.join(ignored)}: ignored, "
            "only USER and DOMAIN are exported"
        )


if __name__ == "__main__":  # pragma: no cover - the installed script calls main()
    main()
