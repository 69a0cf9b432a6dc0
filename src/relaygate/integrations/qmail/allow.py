"""relay-ctrl-allow: open a relay window for the client that just logged in.

Theory of operation
-------------------
Run after a successful POP3/IMAP password check, in the place relay-ctrl 3.x
takes: ``qmail-popup host checkpassword relay-ctrl-allow qmail-pop3d Maildir``
(checkpassword runs it only after a good password), or as a Courier
authentication module (then ``$AUTHUSER`` and ``$AUTHARGV0`` are set and only
a non-empty ``$AUTHENTICATED`` counts as a login).

It records ``$TCPREMOTEIP`` in the store: in the spool a file named after the
address, written to ``.<sec>.<usec>:<pid>`` and renamed into place, holding
``USER=<v>\\0DOMAIN=<v>\\0`` (each only when set), mode 0600 (0666 when the
directory came as ``$RELAY_CTRL_DIR_FD``), byte for byte what the C program
writes, so both can share one spool. Then it ``execvp``s the rest of its
arguments (with none, it exits 0).

Better than the original: IPv6 clients can log in (the C program refuses any
address with a colon), and ``$RELAYGATE_STORE`` writes to SQLite or Redis.
A failure to record the window is a warning, never a failed login: the user
still gets their mail, they just cannot relay. A ``$RELAY_CTRL_EXPIRY`` that
is not a plain positive integer is such a failure (one warning naming it, no
window recorded), never a silent window of 1 or 900 seconds.
"""

from __future__ import annotations

import os
import sys
import time

from relaygate.errors import ConfigError, StoreError
from relaygate.grants import Grant
from relaygate.integrations.qmail.env import (
    Messages,
    StoreChoice,
    client_address,
    close_dir_fd,
    courier_authenticated,
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

PROGRAM = "relay-ctrl-allow"

#: Where grants written by the chain programs say they came from (SQLite/Redis keep it).
SOURCE = "qmail"


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv if argv is None else argv
    wants_help(args, PROGRAM)
    say = Messages(PROGRAM)
    env = os.environ
    ip = client_address(env.get("TCPREMOTEIP"), say)
    if courier_authenticated(env):
        try:
            record(env, ip, say)
        except Exception as exc:  # the login itself must still succeed
            say.warn(f"Could not record {ip}: {shown(repr(exc))}")
    if len(args) > 1:
        exec_next(args[1:], say)
    raise SystemExit(0)


def user_value(env: MutableMapping[str, str], name: str, say: Messages) -> str | None:
    """$USER/$DOMAIN as stored: None when unset or not storable (warned)."""
    value = env.get(name)
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        say.warn(f"${name} is not UTF-8, not recorded: {shown(os.fsencode(value))}")
        return None
    return value


def record(env: MutableMapping[str, str], ip: str, say: Messages) -> None:
    """Write the grant for ``ip``; every failure is a warning (the login still succeeds)."""
    try:
        expiry = expiry_from_env(env)
    except ValueError as exc:
        say.warn(f"{exc}: not recording {ip}")  # no window of a length nobody chose
        return
    choice: StoreChoice | None = None
    try:
        choice = open_store_from_env(env, expiry, say)
        if choice is None:
            return
        grant = Grant.opening(ip, user_value(env, "USER", say), user_value(env, "DOMAIN", say),
                              SOURCE, time.time(), expiry)
        choice.store.put(grant)
    except (StoreError, ConfigError, ValueError) as exc:
        say.warn(f"Could not record {ip}: {exc}")
        return
    finally:
        if choice is not None:
            if not choice.is_spool:
                choice.store.close()
            close_dir_fd(choice)
    if "RELAY_CTRL_LOG_IPS" in env:
        say.msg(f"IP {ip} allowed to relay for {expiry} seconds")


if __name__ == "__main__":  # pragma: no cover - the installed script calls main()
    main()
