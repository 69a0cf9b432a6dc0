"""Parsing of the highly available Redis store URLs, without importing redis.

``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB][?options]`` names a
master watched by Redis Sentinel; ``redis+cluster://HOST:PORT[,HOST:PORT...][?options]``
names the startup nodes of a Redis Cluster. Both take their secrets and TLS
settings as query options (below), never as ``user:password@`` in the host
part, because with several hosts it would be unclear whose password it is.

The settings parse these at start-up (``check_url``) so a bad URL is a config
error naming its file and line before anything connects; the store parses them
again when it opens. Every error shows the URL with its passwords redacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from relaygate.errors import ConfigError

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"

#: Default ports when a host is given without one.
SENTINEL_PORT = 26379
CLUSTER_PORT = 6379

#: Options that are strings passed on as they are (credentials, file names).
_TEXT = {
    "username", "password", "sentinel_username", "sentinel_password",
    "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
}
#: Options that are booleans.
_BOOL = {"ssl", "sentinel_ssl", "ssl_check_hostname"}
#: Options that are positive seconds.
_SECONDS = {"socket_timeout", "socket_connect_timeout"}
_CERT_REQS = ("none", "optional", "required")
#: Options that only make sense with Sentinel.
_SENTINEL_ONLY = {"sentinel_username", "sentinel_password", "sentinel_ssl"}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class HaRedisURL:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    service: str | None = None  # Sentinel only: the master's name
    db: int = 0
    prefix: str | None = None  # None: the store's default
    options: dict[str, object] = field(default_factory=dict)

    @property
    def sentinel(self) -> bool:
        return self.scheme == SENTINEL_SCHEME


def redact(url: str) -> str:
    from relaygate.stores.urls import redact_url

    return redact_url(url)


def _fail(message: str, url: str) -> ConfigError:
    return ConfigError(message, value=redact(url))


def _hosts(netloc: str, default_port: int, url: str) -> tuple[tuple[str, int], ...]:
    if "@" in netloc:
        raise _fail("put credentials in ?password= (and ?sentinel_password=), "
                    "not before the host", url)
    out: list[tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            raise _fail("empty host in the host list", url)
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise _fail(f"bad host {item!r}", url)
            port_text = rest[1:] if rest else ""
        else:
            host, _, port_text = item.partition(":")
            if ":" in port_text:
                raise _fail(f"bad host {item!r} (write IPv6 addresses as [addr]:port)", url)
        if not host:
            raise _fail(f"bad host {item!r}", url)
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise _fail(f"bad port in {item!r}", url)
            port = int(port_text)
        else:
            port = default_port
        out.append((host, port))
    return tuple(out)


def parse_ha_url(url: str) -> HaRedisURL:
    """Parse a Sentinel or Cluster store URL; ConfigError (URL redacted) if it is bad."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise _fail("not a redis+sentinel:// or redis+cluster:// URL", url)
    if parts.fragment:
        raise _fail("a store URL has no #fragment", url)
    sentinel = scheme == SENTINEL_SCHEME
    if not parts.netloc:
        raise _fail("no host in the store URL", url)
    hosts = _hosts(parts.netloc, SENTINEL_PORT if sentinel else CLUSTER_PORT, url)
    segments = [unquote(s) for s in parts.path.split("/")[1:]]
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    service: str | None = None
    db = 0
    if sentinel:
        if not segments or not segments[0]:
            raise _fail("a Sentinel store URL needs the master's name: "
                        "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]", url)
        service = segments[0]
        if len(segments) > 2:
            raise _fail("too many path parts (want /SERVICE[/DB])", url)
        if len(segments) == 2:
            if not segments[1].isdigit():
                raise _fail(f"database number must be a number, not {segments[1]!r}", url)
            db = int(segments[1])
    elif segments:
        # Redis Cluster has only database 0
        raise _fail("a Cluster store URL has no path (Redis Cluster has only database 0)", url)
    prefix: str | None = None
    options: dict[str, object] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key in options or (key == "prefix" and prefix is not None):
            raise _fail(f"option {key} given twice", url)
        if key == "prefix":
            if not value:
                raise _fail("Redis key prefix must not be empty", url)
            if not sentinel and ("{" in value or "}" in value):
                raise _fail("a Cluster key prefix must not contain { or }: the store "
                            "chooses the hash tags itself", url)
            prefix = value
        elif key in _SENTINEL_ONLY and not sentinel:
            raise _fail(f"option {key} is for Sentinel URLs only", url)
        elif key in _TEXT:
            options[key] = value
        elif key in _BOOL:
            low = value.lower()
            if low not in _TRUE + _FALSE:
                raise _fail(f"option {key} must be true or false, not {value!r}", url)
            options[key] = low in _TRUE
        elif key in _SECONDS:
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds <= 3600:
                raise _fail(f"option {key} must be seconds (0 < n <= 3600), not {value!r}", url)
            options[key] = seconds
        elif key == "ssl_cert_reqs":
            if value not in _CERT_REQS:
                raise _fail(f"option ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}", url)
            options[key] = value
        else:
            raise _fail(f"unknown option {key!r} in the store URL", url)
    if any(k.startswith("ssl_") for k in options) and not (
        options.get("ssl") or options.get("sentinel_ssl")
    ):
        raise _fail("ssl_* options need ssl=true (or sentinel_ssl=true)", url)
    return HaRedisURL(scheme, hosts, service, db, prefix, options)
