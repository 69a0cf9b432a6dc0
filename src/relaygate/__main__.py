"""``python -m relaygate`` runs the ``relaygate`` command."""

from relaygate.entry import run

run()
