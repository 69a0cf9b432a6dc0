"""relay-ctrl-age: delete expired relay windows (run from cron every minute).

Theory of operation
-------------------
``* * * * * envdir /etc/relay-ctrl relay-ctrl-age`` as in relay-ctrl 3.x:
every entry of ``$RELAY_CTRL_DIR`` whose mtime is older than
``$RELAY_CTRL_EXPIRY`` seconds (default 900) is removed, leftover temporary
files (``.<sec>.<usec>:<pid>``) included. A missing directory is exit 1, as in
the C program. With ``$RELAYGATE_STORE`` the SQLite or Redis store is aged
instead (Redis expires keys by itself; aging it is cheap).

Silent on success (cron mails any output); with ``$RELAY_CTRL_LOG_IPS`` set it
says how many windows it closed.
"""

from __future__ import annotations

import os
import sys
import time

from relaygate.errors import ConfigError, StoreError
from relaygate.integrations.qmail.env import (
    EXIT_TEMPFAIL,
    Messages,
    StoreChoice,
    expiry_from_env,
    open_store_from_env,
    wants_help,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

PROGRAM = "relay-ctrl-age"

#: relay-ctrl-age's exit code when the spool cannot be reached.
EXIT_NO_SPOOL = 1


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv if argv is None else argv
    wants_help(args, PROGRAM)
    say = Messages(PROGRAM, show_pid=False)
    env = os.environ
    try:
        expiry = expiry_from_env(env)
    except ValueError as exc:
        say.die(EXIT_TEMPFAIL, str(exc))
    if not env.get("RELAYGATE_STORE") and "RELAY_CTRL_DIR" not in env \
            and "RELAY_CTRL_DIR_FD" not in env:
        say.die(EXIT_NO_SPOOL, "$RELAY_CTRL_DIR is not set.")
    choice: StoreChoice | None = None
    try:
        choice = open_store_from_env(env, expiry, say)
        if choice is None:
            raise SystemExit(EXIT_NO_SPOOL)
        removed = choice.store.age(time.time())
    except (StoreError, ConfigError) as exc:
        say.die(EXIT_NO_SPOOL, f"Could not age the relay windows: {exc}")
    finally:
        if choice is not None:
            choice.store.close()
    if "RELAY_CTRL_LOG_IPS" in env:
        say.msg(f"removed {removed} expired IP{'s' if removed != 1 else ''}")
    raise SystemExit(0)


if __name__ == "__main__":  # pragma: no cover - the installed script calls main()
    main()
