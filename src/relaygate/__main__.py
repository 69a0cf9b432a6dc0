"""``python -m relaygate`` runs the ``relaygate`` command."""

from relaygate.cli import run

run()
