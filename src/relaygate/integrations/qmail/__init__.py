"""relay-ctrl 3.x compatible chain programs for qmail (and Courier).

``relay-ctrl-check`` runs once per SMTP connection, so this package's
``__init__`` imports nothing and each program imports only what it needs:
the check path is ``os``, ``sys``, ``relaygate.errors``, ``relaygate.addresses``,
``relaygate.grants`` and ``relaygate.stores.spool`` (see ``check.py``).
"""
