"""Build the running pieces (store, rules, RelayControl) from Settings."""

from __future__ import annotations

from relaygate.config import Settings
from relaygate.control import RelayControl
from relaygate.errors import ConfigError
from relaygate.networks import Networks
from relaygate.rules import RuleSet
from relaygate.stores import open_store


def build_control(settings: Settings) -> RelayControl:
    """Open the store and load the rules named by the settings.

    The SQLite default lives in the data directory, which is created (0700)
    when missing.
    """
    if settings.store is None:
        make_data_dir(settings)
    store = open_store(settings.store_url, expiry=settings.expiry)
    rules = RuleSet.load(settings.rules_file) if settings.rules_file else RuleSet.empty()
    return RelayControl(store, rules, expiry=settings.expiry, relayclient=settings.relayclient,
                        trusted_proxies=Networks(settings.trusted_proxies))


def make_data_dir(settings: Settings) -> None:
    """Create the data directory (mode 0700) when missing; ConfigError when it cannot be."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create the data directory ({exc.strerror or exc})",
                          value=str(settings.data_dir)) from None
