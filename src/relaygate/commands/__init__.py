"""``relaygate`` subcommands, one module per area, imported lazily by ``relaygate.cli``."""
