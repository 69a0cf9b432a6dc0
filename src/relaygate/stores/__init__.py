"""Grant stores, selected by URL.

``memory:``, ``spool:///var/spool/relay-ctrl/allow``, ``sqlite:///path/grants.db``,
``redis://host:port/db`` (``?prefix=relaygate:`` sets the key prefix). Each
backend module is imported only when its URL is used, so the chain programs pay
for the one store they run with and nothing else.
"""

from __future__ import annotations

from relaygate.errors import ConfigError

# Not `from typing import TYPE_CHECKING`: typing costs ~5-20 ms of start-up, paid by
# relay-ctrl-check on every SMTP connection (mypy treats this name the same way).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from relaygate.stores.base import GrantStore

SCHEMES = ("memory", "spool", "sqlite", "redis", "rediss")


def open_store(url: str, *, expiry: float = 900.0) -> GrantStore:
    """Open the store named by ``url``; ``expiry`` is the default window length.

    Raises ConfigError for a URL that names no store (the message shows the URL).
    """
    scheme, sep, rest = url.partition(":")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(
            "store URL must start with memory:, spool://, sqlite://, redis:// or rediss://",
            value=url,
        )
    if scheme == "memory":
        from relaygate.stores.memory import MemoryStore

        return MemoryStore()
    if scheme == "spool":
        from relaygate.stores.spool import SpoolStore

        return SpoolStore(_path_of(url, rest), expiry=expiry)
    if scheme == "sqlite":
        from relaygate.stores.sqlite import SqliteStore

        return SqliteStore(_path_of(url, rest))
    from relaygate.stores.redis import RedisStore

    return RedisStore.from_url(url)


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
