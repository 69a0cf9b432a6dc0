"""Build the running pieces (store, rules, RelayControl) from Settings."""

from __future__ import annotations

from relaygate.config import Settings
from relaygate.control import RelayControl
from relaygate.rules import RuleSet
from relaygate.stores import open_store


def build_control(settings: Settings) -> RelayControl:
    """Open the store and load the rules named by the settings.

    The SQLite default lives in the data directory, which is created (0700)
    when missing.
    """
    if settings.store is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_store(settings.store_url, expiry=settings.expiry)
    rules = RuleSet.load(settings.rules_file) if settings.rules_file else RuleSet.empty()
    return RelayControl(store, rules, expiry=settings.expiry, relayclient=settings.relayclient)
