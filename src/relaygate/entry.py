"""The ``relaygate`` console script: hands the per-login hook its own fast start.

``relaygate dovecot-postlogin`` runs once per POP3 or IMAP login, so it goes
straight to :mod:`relaygate.integrations.dovecot`, which reads the same options,
without importing the click CLI and its command table first (about half of the
hook's start-up). Everything else goes through the CLI, including global options
written before the subcommand (``relaygate --store URL dovecot-postlogin ...``)
and ``--help``.
"""

from __future__ import annotations

import sys


def run() -> None:
    argv = sys.argv[1:]
    if len(argv) >= 2 and argv[0] == "dovecot-postlogin" and argv[1] not in ("-h", "--help"):
        from relaygate.integrations.dovecot import main

        main(argv[1:])  # execs the program or exits; never returns
    from relaygate.cli import run as cli_run

    cli_run()
