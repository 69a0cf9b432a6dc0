"""Grant stores, selected by URL.

``memory:``, ``spool:///var/spool/relay-ctrl/allow``, ``sqlite:///path/grants.db``,
``redis://host:port/db`` (``?prefix=relaygate:`` sets the key prefix),
``redis+sentinel://host:port,host:port/service[/db]`` and
``redis+cluster://host:port,host:port`` (stores/redis_url.py). Each
backend module is imported only when its URL is used, so the chain programs pay
for the one store they run with and nothing else.
"""

from __future__ import annotations

from relaygate.errors import ConfigError
from relaygate.stores.urls import redact_url

# Not `from typing import TYPE_CHECKING`: importing typing cost 92 ms (36-249 ms;
# python -X importtime, five runs on the loaded 2-core test machine, December 2026),
# paid by relay-ctrl-check on every SMTP connection (mypy treats this name the same way).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from relaygate.stores.base import GrantStore

__all__ = ["SCHEMES", "check_url", "open_store", "redact_url"]

SCHEMES = ("memory", "spool", "sqlite", "redis", "rediss", "redis+sentinel", "redis+cluster")


def open_store(url: str, *, expiry: float = 900.0, warn: bool = True) -> GrantStore:
    """Open the store named by ``url``; ``expiry`` is the default window length.

    Raises ConfigError for a URL that names no store (the message shows the URL).
    ``warn=False`` skips the spool's world-writable warning (per-login programs).
    """
    scheme, rest = check_url(url)
    if scheme == "memory":
        from relaygate.stores.memory import MemoryStore

        return MemoryStore()
    if scheme == "spool":
        from relaygate.stores.spool import SpoolStore

        return SpoolStore(_path_of(url, rest), expiry=expiry, warn=warn)
    if scheme == "sqlite":
        from relaygate.stores.sqlite import SqliteStore

        return SqliteStore(_path_of(url, rest))
    from relaygate.stores.redis import RedisStore

    return RedisStore.from_url(url)  # redis://, rediss://, redis+sentinel://, redis+cluster://


def check_url(url: str) -> tuple[str, str]:
    """(scheme, rest) of a store URL, or ConfigError; nothing is opened or imported.

    The settings call this at start-up so a bad URL is reported with the file
    and line (or variable) it came from, before any server starts.
    """
    scheme, sep, rest = url.partition(":")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(
            "store URL must start with memory:, spool://, sqlite://, redis://, rediss://, "
            "redis+sentinel:// or redis+cluster://",
            value=redact_url(url),
        )
    if scheme in ("spool", "sqlite"):
        _path_of(url, rest)
    elif scheme in ("redis", "rediss"):
        from urllib.parse import urlsplit

        try:
            urlsplit(url).port  # noqa: B018 - parsing the port is the check
        except ValueError as exc:
            raise ConfigError(f"bad Redis store URL ({exc})", value=redact_url(url)) from None
    elif scheme in ("redis+sentinel", "redis+cluster"):
        from relaygate.stores.redis_url import parse_ha_url

        parse_ha_url(url)
    return scheme, rest


def _path_of(url: str, rest: str) -> str:
    # spool:///abs/path -> /abs/path ; spool://relative/path and spool:relative -> relative
    if rest.startswith("///"):
        path = rest[2:]
    elif rest.startswith("//"):
        path = rest[2:]
    else:
        path = rest
    if not path:
        raise ConfigError("store URL has no path", value=url)
    return path
