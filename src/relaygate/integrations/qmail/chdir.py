"""relay-ctrl-chdir: hand the spool directory down as a descriptor.

Theory of operation
-------------------
The secure deployment keeps the spool where no local user can reach it
(``/var/spool/relay-ctrl`` mode 0700, owned by root) and still lets the
unprivileged POP and SMTP processes write and read it: a root-run
``relay-ctrl-chdir`` opens ``$RELAY_CTRL_DIR`` *before* privileges drop,
moves the descriptor out of the way of the low numbers (to the highest free
one at or below 255), exports its number as ``$RELAY_CTRL_DIR_FD`` and
``execvp``s the rest of its arguments::

    relay-ctrl-chdir tcpserver -u QMAILD -g RELAYGRP 0 smtp relay-ctrl-check qmail-smtpd

``relay-ctrl-allow``, ``relay-ctrl-check`` and ``relay-ctrl-udp`` then work
relative to that descriptor (``openat``), so the path (and its 0700 parent)
never needs to be reachable by the user they run as. This is relay-ctrl's
design; relaygate adds a warning when the directory itself is world-writable,
which the descriptor makes unnecessary.
"""

from __future__ import annotations

import os
import stat
import sys

from relaygate.integrations.qmail.env import (
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    HIGH_FD,
    LOW_FD,
    Messages,
    exec_next,
    shown,
    wants_help,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

PROGRAM = "relay-ctrl-chdir"


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv if argv is None else argv
    wants_help(args, PROGRAM)
    say = Messages(PROGRAM)
    if len(args) < 2:
        say.die(EXIT_USAGE, "usage: relay-ctrl-chdir program [arguments]")
    directory = os.environ.get("RELAY_CTRL_DIR")
    if directory is None:
        say.die(EXIT_TEMPFAIL, "$RELAY_CTRL_DIR is not set.")
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        say.die(EXIT_TEMPFAIL, f"'{shown(directory)}' is not a directory")
    except OSError as exc:
        say.die(EXIT_TEMPFAIL, f"Could not open dir '{shown(directory)}': {exc.strerror}")
    mode = os.fstat(fd).st_mode
    if mode & stat.S_IWOTH:
        say.warn(f"'{shown(directory)}' is world-writable (mode {stat.S_IMODE(mode):04o}): "
                 "with relay-ctrl-chdir it need not be; make it 0770 for a shared group")
    high = move_high(fd)
    if high is None:
        say.die(EXIT_TEMPFAIL, "Could not move the directory descriptor")
    os.environ["RELAY_CTRL_DIR_FD"] = str(high)
    exec_next(args[1:], say)


def move_high(fd: int) -> int | None:
    """Duplicate ``fd`` (inheritable) to the highest free number in [LOW_FD, HIGH_FD]."""
    for candidate in range(HIGH_FD, LOW_FD - 1, -1):
        try:
            os.fstat(candidate)
            continue  # in use
        except OSError:
            pass
        try:
            os.dup2(fd, candidate)  # the copy is inheritable: it must survive exec
        except OSError:
            continue  # above the descriptor limit: try lower
        os.close(fd)
        return candidate
    return None


if __name__ == "__main__":  # pragma: no cover - the installed script calls main()
    main()
