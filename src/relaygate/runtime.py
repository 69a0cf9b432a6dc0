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


def require_store(settings: Settings) -> None:
    """ConfigError unless the store the settings name already exists.

    Read-only admin commands (``check``, ``list``, ``revoke``, ``age``) call
    this first: run from the wrong directory they would otherwise create an
    empty ``./relaygate-data/grants.db`` and report "no open windows", which
    reads as "nobody logged in". The message says what was looked for.
    """
    import os

    from relaygate.stores import check_url

    scheme, _ = check_url(settings.store_url)
    if scheme not in ("sqlite", "spool"):
        return  # Redis answers or fails for itself; memory: is always there
    from relaygate.stores import _path_of

    path = _path_of(settings.store_url, settings.store_url.partition(":")[2])
    found = os.path.isdir(path) if scheme == "spool" else os.path.isfile(path)
    if found:
        return
    what = "spool directory" if scheme == "spool" else "database"
    if settings.store is None:
        where = (f"no grant store: {os.path.abspath(path)} does not exist (data directory "
                 f"{settings.data_dir})")
    else:
        where = f"no grant store: the {what} {path} does not exist"
    raise ConfigError(f"{where}; give --data-dir, --store or --config (or $RELAYGATE_DATA_DIR) "
                      "for the one serve, policyd or the chain programs use; they create it")


def make_data_dir(settings: Settings) -> None:
    """Create the data directory (mode 0700) when missing; ConfigError when it cannot be."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create the data directory ({exc.strerror or exc})",
                          value=str(settings.data_dir)) from None
