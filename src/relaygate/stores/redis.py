"""Redis grant store: one live view shared by several POP/IMAP and SMTP hosts.

Theory of operation
-------------------
Key layout (``P`` is the prefix, default ``relaygate:grant:``)::

    P<ip>            hash {user, domain, source, opened_at, expires_at}
                     (user/domain absent when unknown), PEXPIREAT expires_at
    P@expiry         sorted set: member <ip>, score expires_at
    P@user:<user>    set of the <ip>s whose grant that user opened,
                     PEXPIREAT the latest of those grants' expiries

``<ip>`` is always the canonical address, so ``@`` (which no address
contains) keeps the index keys apart from grant keys. Every change runs as
one Lua script (https://redis.io/docs/latest/develop/interactive/programmability/eval-intro/),
so the hash, the expiry index and the user index never disagree, even with
many hosts writing.

Semantics:

- Redis itself removes a grant's hash when its TTL runs out, so ``get`` works
  without anyone aging the store. ``get`` and ``list`` also compare
  ``expires_at`` with the caller's ``now`` (clocks of the hosts may differ from
  the Redis server's by a little).
- ``age(now)`` removes the index entries (and any hash still there) of grants
  with ``expires_at < now`` and returns how many there were: the number of
  grants that expired since the last ``age``, whether or not Redis had already
  dropped their hashes. It works through the sorted set in batches of
  :data:`AGE_BATCH`, so it costs what expired and never blocks Redis for long.
- ``list(now)`` reads the sorted set from ``now`` upwards (never ``KEYS`` or a
  scan of the keyspace) and fetches those hashes in pipelined batches.
- ``delete_user`` reads the user's set and removes the grants that still name
  that user (a later login by someone else from the same address is kept).

Sockets time out after :data:`CONNECT_TIMEOUT` / :data:`SOCKET_TIMEOUT`
seconds with one immediate retry, so a dead Redis turns into
:class:`StoreError` (TEMPFAIL) within a couple of seconds instead of hanging an
SMTP session. Every redis-py error and ``OSError`` becomes StoreError.

Highly available Redis (URLs parsed in stores/redis_url.py)
-----------------------------------------------------------
``redis+sentinel://`` uses redis-py's Sentinel client: each new connection asks
the sentinels for the current master (``SENTINEL MASTERS``; a master they see as
down is no answer), a connection that fails or finds a demoted master
(``READONLY``) is dropped, and the next command connects to whichever master
the sentinels name then. Between the master's death and the replica's promotion
every operation fails (refused connection, or no master known) and becomes
StoreError, so relaying fails closed and resumes by itself after the failover.
The key layout is the plain one above.

``redis+cluster://`` uses redis-py's RedisCluster (MOVED/ASK handling, slot
map). A Lua script may only touch keys of one hash slot, so the keys are spread
over :data:`CLUSTER_TAGS` buckets, each one hash tag::

    P{t}<ip>  P{t}@expiry  P{t}@user:<user>     t = CLUSTER_TAGS[crc32(ip) % 16]

A grant, its entry in the expiry index and its user-set entry live in the
bucket of its address, so ``put``/``get``/``delete`` touch one slot.
``age``, ``list`` and ``delete_user`` visit every bucket, one single-slot script
or pipeline each: they work across shards without any cross-slot command. The
tags are chosen so that bucket ``i`` lies in the ``i``-th sixteenth of the slot
space, so the buckets spread over the masters of any evenly split cluster. The
client connects on first use (not when the store is opened), so a cluster that
is down at start-up is TEMPFAIL like any other outage.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from relaygate.addresses import require_canonical
from relaygate.errors import ConfigError, StoreError
from relaygate.grants import Grant
from relaygate.stores.redis_url import HaRedisURL, parse_ha_url
from relaygate.stores.urls import redact_url

DEFAULT_PREFIX = "relaygate:grant:"

#: Seconds to wait for a TCP connection: a dead Redis must give TEMPFAIL fast.
CONNECT_TIMEOUT = 1.0

#: Seconds to wait for a reply: our commands are O(1) or small batches.
SOCKET_TIMEOUT = 1.0

#: Retries after a connection error (one: a pooled connection may be stale after a restart).
RETRIES = 1

#: Expired grants removed per script call in age(): bounds how long Redis is busy with us.
AGE_BATCH = 1000

#: Hashes fetched per pipeline round trip in list().
LIST_BATCH = 1000

#: Hash tags of the Redis Cluster buckets (module docstring). Fixed: every host
#: sharing a store must agree on them; tag i hashes to a slot in the i-th
#: sixteenth of 0..16383 (tests/stores/test_redis_ha.py checks it).
CLUSTER_TAGS = ("03", "122", "212", "311", "461", "562", "60", "742",
                "843", "940", "a21", "b60", "c13", "d13", "e61", "f20")

#: How redis-py words a connection the server closed during or right after the TLS
#: handshake (a client certificate missing or refused; plain text to a TLS port).
_CLOSED = ("EOF occurred in violation of protocol", "Connection reset by peer",
           "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
           "TLSV1_ALERT_UNKNOWN_CA")

#: The TLS options that name files.
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")

#: What redis-py raises: RedisClusterException is not a RedisError.
_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)


class _Bucket(NamedTuple):
    """The keys of one group of grants that live in one hash slot (or the whole store)."""

    prefix: str  # grant hash = prefix + ip
    expiry_key: str
    user_prefix: str  # user set = user_prefix + user

_PUT = """
local old = redis.call('HGET', KEYS[1], 'user')
if old and (ARGV[2] ~= '1' or old ~= ARGV[3]) then
  redis.call('SREM', ARGV[10] .. old, ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'source', ARGV[6], 'opened_at', ARGV[7], 'expires_at', ARGV[8])
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'domain', ARGV[5]) end
local exp = tonumber(ARGV[9])
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'user', ARGV[3])
  local us = ARGV[10] .. ARGV[3]
  redis.call('SADD', us, ARGV[1])
  local ttl = redis.call('PTTL', us)
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if ttl < 0 or now_ms + ttl < exp then redis.call('PEXPIREAT', us, exp) end
end
redis.call('PEXPIREAT', KEYS[1], exp)
redis.call('ZADD', KEYS[2], ARGV[8], ARGV[1])
return 1
"""

_DELETE = """
local u = redis.call('HGET', KEYS[1], 'user')
if u then redis.call('SREM', ARGV[2] .. u, ARGV[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""

_DELETE_USER = """
local ips = redis.call('SMEMBERS', KEYS[1])
local n = 0
for _, ip in ipairs(ips) do
  local k = ARGV[1] .. ip
  if redis.call('HGET', k, 'user') == ARGV[2] then
    redis.call('DEL', k)
    redis.call('ZREM', KEYS[2], ip)
    n = n + 1
  end
end
redis.call('DEL', KEYS[1])
return n
"""

_AGE = """
local ips = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1],
                       'LIMIT', 0, tonumber(ARGV[3]))
for _, ip in ipairs(ips) do
  local k = ARGV[2] .. ip
  local u = redis.call('HGET', k, 'user')
  if u then redis.call('SREM', ARGV[4] .. u, ip) end
  redis.call('DEL', k)
end
if #ips > 0 then redis.call('ZREM', KEYS[1], unpack(ips)) end
return #ips
"""



class _Sentinel(Sentinel):
    """redis-py's Sentinel client whose MasterNotFoundError says, in a few words per
    sentinel, why none named a master: unreachable (with the TLS or password error),
    master seen as down, or service unknown."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        why: list[str] = []
        for i, sentinel in enumerate(self.sentinels):
            kw = sentinel.connection_pool.connection_kwargs
            where = f"{kw.get('host')}:{kw.get('port')}"
            try:
                masters = cast("dict[str, dict[str, Any]]", sentinel.sentinel_masters())
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                why.append(f"{where}: {type(exc).__name__}: {exc}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(  # type: ignore[no-untyped-call]
                state, service_name
            ):
                # the one that answered is asked first next time (as redis-py does)
                self.sentinels[0], self.sentinels[i] = sentinel, self.sentinels[0]
                return state["ip"], state["port"]
            why.append(f"{where}: " + ("no live master" if state else "service unknown"))
        raise MasterNotFoundError("; ".join(why))


def _num(value: float) -> str:
    # repr() round-trips a float exactly; Redis parses it with strtod.
    return repr(float(value))


class RedisStore:
    """Grants in Redis (see the module docstring); ``client`` is a sync ``redis.Redis``
    (or ``RedisCluster``), made on first use by ``connect`` when no client is given."""

    kind = "redis"

    def __init__(
        self,
        client: Any = None,
        prefix: str = DEFAULT_PREFIX,
        *,
        owns_client: bool = False,
        connect: Callable[[], Any] | None = None,
        cluster: bool = False,
        mode: str = "redis",
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if not prefix:
            raise ValueError("the Redis key prefix must not be empty")
        if client is None and connect is None:
            raise ValueError("give a client or a connect function")
        self.prefix = prefix
        #: redis, sentinel or cluster: how the store finds its server(s)
        self.mode = mode
        if cluster:
            self._buckets = [
                _Bucket(f"{prefix}{{{t}}}", f"{prefix}{{{t}}}@expiry", f"{prefix}{{{t}}}@user:")
                for t in CLUSTER_TAGS
            ]
        else:
            self._buckets = [_Bucket(prefix, prefix + "@expiry", prefix + "@user:")]
        self._owns_client = owns_client
        self._connect = connect
        self._on_close = on_close
        self._sentinels = ""  # "host:port, ..." for errors, when the store uses Sentinel
        #: None: no TLS; else the TLS files it was given (ssl_ca_certs, ssl_certfile, ...)
        self._tls: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._client: Any = None
        if client is not None:
            self._attach(client)

    def _attach(self, client: Any) -> None:
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._delete_user = client.register_script(_DELETE_USER)
        self._age = client.register_script(_AGE)
        self._client = client

    @property
    def client(self) -> Any:
        """The redis-py client, connected on first use (raises what redis-py raises)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    assert self._connect is not None
                    self._attach(self._connect())
        return self._client

    def _bucket(self, ip: str) -> _Bucket:
        if len(self._buckets) == 1:
            return self._buckets[0]
        return self._buckets[zlib.crc32(ip.encode("ascii")) % len(self._buckets)]

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """``redis://[user:pass@]host:port/db?prefix=...`` (or ``rediss://`` for TLS).

        ``prefix`` sets the key prefix; other query options go to redis-py
        (e.g. ``socket_timeout=2``), overriding our short defaults.
        """
        parts = urlsplit(url)
        if parts.scheme in ("redis+sentinel", "redis+cluster"):
            return cls._from_ha_url(parse_ha_url(url))
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError("Redis store URL must start with redis://, rediss://, "
                              "redis+sentinel:// or redis+cluster://", value=redact_url(url))
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = DEFAULT_PREFIX
        rest = []
        for key, value in query:
            if key == "prefix":
                prefix = value
            else:
                rest.append((key, value))
        if not prefix:
            raise ConfigError("Redis key prefix must not be empty", value=redact_url(url))
        clean = urlunsplit(parts._replace(query=urlencode(rest)))
        try:
            client = redis.Redis.from_url(
                clean,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), RETRIES),
            )
        except ValueError as exc:
            raise ConfigError(f"bad Redis store URL ({exc})", value=redact_url(url)) from None
        store = cls(client, prefix, owns_client=True)
        options = dict(rest)
        if parts.scheme == "rediss":
            store._tls = {k: v for k, v in options.items() if k in _TLS_FILES}
        return store

    @classmethod
    def _from_ha_url(cls, parsed: HaRedisURL) -> RedisStore:
        opts = dict(parsed.options)
        timeouts = {
            "socket_connect_timeout": opts.pop("socket_connect_timeout", CONNECT_TIMEOUT),
            "socket_timeout": opts.pop("socket_timeout", SOCKET_TIMEOUT),
        }
        tls = {k: opts.pop(k) for k in list(opts) if k.startswith("ssl_")}
        prefix = parsed.prefix or DEFAULT_PREFIX
        data: dict[str, Any] = dict(timeouts)
        for key in ("username", "password"):
            if key in opts:
                data[key] = opts[key]
        if opts.get("ssl"):
            data["ssl"] = True
            data.update(tls)
        if parsed.sentinel:
            assert parsed.service is not None
            # No retries against a sentinel (redis-py's default backs off for seconds):
            # discover_master already asks the next one.
            side: dict[str, Any] = dict(timeouts, retry=Retry(NoBackoff(), 0))
            for key in ("username", "password"):
                if f"sentinel_{key}" in opts:
                    side[key] = opts[f"sentinel_{key}"]
            if opts.get("sentinel_ssl", opts.get("ssl")):
                side["ssl"] = True
                side.update(tls)
            sentinel = _Sentinel(  # type: ignore[no-untyped-call]
                list(parsed.hosts), sentinel_kwargs=side
            )
            client = sentinel.master_for(  # type: ignore[no-untyped-call]
                parsed.service, db=parsed.db, retry=Retry(NoBackoff(), RETRIES), **data
            )

            def close_sentinels() -> None:
                for s in sentinel.sentinels:
                    s.close()

            store = cls(client, prefix, owns_client=True, mode="sentinel",
                        on_close=close_sentinels)
            store._sentinels = ", ".join(f"{h}:{p}" for h, p in parsed.hosts)
            if opts.get("ssl") or opts.get("sentinel_ssl"):
                store._tls = {k: str(v) for k, v in tls.items() if k in _TLS_FILES}
            return store

        from redis.cluster import ClusterNode, RedisCluster

        def connect() -> Any:
            return RedisCluster(
                startup_nodes=[ClusterNode(h, p)  # type: ignore[no-untyped-call]
                               for h, p in parsed.hosts],
                retry=Retry(NoBackoff(), RETRIES),
                **data,
            )

        store = cls(None, prefix, owns_client=True, connect=connect, cluster=True,
                    mode="cluster")
        if opts.get("ssl"):
            store._tls = {k: str(v) for k, v in tls.items() if k in _TLS_FILES}
        return store

    def _error(self, what: str, exc: Exception) -> StoreError:
        if isinstance(exc, MasterNotFoundError):
            # _Sentinel says briefly why each sentinel gave no master (a TLS or password
            # problem with the sentinels must not pass for a dead master)
            why = f" ({exc})" if str(exc) else ""
            return StoreError(f"redis: {what}: MasterNotFoundError: no sentinel "
                              f"({self._sentinels}) names a live master for that service"
                              f"{why}{self._hint(why)}")
        return StoreError(f"redis: {what}: {type(exc).__name__}: {exc}{self._hint(str(exc))}")

    def _hint(self, text: str) -> str:
        """What redis-py's words most likely mean, given our TLS settings: it only says
        "EOF occurred in violation of protocol" or "Connection reset by peer" for a
        connection the server closed, and "No such file or directory" without the file."""
        if self._tls is not None and ("No such file" in text or "Permission denied" in text):
            bad = [f"{k}={v}" for k, v in self._tls.items() if not os.access(v, os.R_OK)]
            if bad:
                return f" (cannot read {', '.join(bad)})"
        if not any(t in text for t in _CLOSED):
            return ""
        if self._tls is None:
            return " (if that port speaks TLS, use rediss:// or ssl=true)"
        cert = self._tls.get("ssl_certfile")
        if not cert:
            return (" (the server closed the TLS connection: if it requires client "
                    "certificates (tls-auth-clients yes), set ssl_certfile and ssl_keyfile)")
        return (f" (the server closed the TLS connection: does it accept the client "
                f"certificate {cert}? its CA must be in the server's tls-ca-cert-file)")

    @staticmethod
    def _grant(ip: str, fields: dict[bytes, bytes]) -> Grant:
        try:
            user = fields.get(b"user")
            domain = fields.get(b"domain")
            return Grant(
                ip,
                None if user is None else user.decode("utf-8"),
                None if domain is None else domain.decode("utf-8"),
                fields.get(b"source", b"").decode("utf-8") or "unknown",
                float(fields[b"opened_at"]),
                float(fields[b"expires_at"]),
            )
        except (KeyError, ValueError) as exc:
            # someone else wrote this key: refuse it rather than guess (fail closed)
            raise StoreError(f"redis: malformed grant record for {ip}: {exc}") from None

    # -- GrantStore ----------------------------------------------------------------

    def put(self, grant: Grant) -> None:
        ip = require_canonical(grant.ip)
        b = self._bucket(ip)
        args = [
            ip,
            "0" if grant.user is None else "1",
            grant.user or "",
            "0" if grant.domain is None else "1",
            grant.domain or "",
            grant.source,
            _num(grant.opened_at),
            _num(grant.expires_at),
            str(int(grant.expires_at * 1000)),
            b.user_prefix,
        ]
        try:
            self.client  # noqa: B018 - connects (and registers the scripts) on first use
            self._put(keys=[b.prefix + ip, b.expiry_key], args=args)
        except _ERRORS as exc:
            raise self._error(f"cannot store grant for {ip}", exc) from None

    def get(self, ip: str, now: float) -> Grant | None:
        ip = require_canonical(ip)
        try:
            fields = cast("dict[bytes, bytes]", self.client.hgetall(self._bucket(ip).prefix + ip))
        except _ERRORS as exc:
            raise self._error(f"cannot read grant for {ip}", exc) from None
        if not fields:
            return None
        grant = self._grant(ip, fields)
        return grant if grant.live(now) else None

    def delete(self, ip: str) -> bool:
        ip = require_canonical(ip)
        b = self._bucket(ip)
        try:
            self.client  # noqa: B018 - connects on first use
            n = self._delete(keys=[b.prefix + ip, b.expiry_key], args=[ip, b.user_prefix])
        except _ERRORS as exc:
            raise self._error(f"cannot delete grant for {ip}", exc) from None
        return int(n) > 0

    def delete_user(self, user: str) -> int:
        n = 0
        try:
            self.client  # noqa: B018 - connects on first use
            for b in self._buckets:
                n += int(self._delete_user(keys=[b.user_prefix + user, b.expiry_key],
                                           args=[b.prefix, user]))
        except _ERRORS as exc:
            raise self._error(f"cannot delete grants of {user}", exc) from None
        return n

    def age(self, now: float) -> int:
        """Remove grants with ``expires_at < now`` from the indexes (and Redis); count them."""
        total = 0
        try:
            self.client  # noqa: B018 - connects on first use
            for b in self._buckets:
                args = [_num(now), b.prefix, str(AGE_BATCH), b.user_prefix]
                while True:
                    n = int(self._age(keys=[b.expiry_key], args=args))
                    total += n
                    if n < AGE_BATCH:
                        break
        except _ERRORS as exc:
            raise self._error("cannot age grants", exc) from None
        return total

    def list(self, now: float) -> list[Grant]:
        grants: list[Grant] = []
        try:
            for b in self._buckets:
                members = cast(
                    "list[bytes]", self.client.zrangebyscore(b.expiry_key, _num(now), "+inf")
                )
                for start in range(0, len(members), LIST_BATCH):
                    chunk = [m.decode("ascii") for m in members[start : start + LIST_BATCH]]
                    pipe = self.client.pipeline(transaction=False)
                    for ip in chunk:
                        pipe.hgetall(b.prefix + ip)
                    replies: list[Any] = pipe.execute()
                    for ip, fields in zip(chunk, replies, strict=True):
                        if fields:
                            grant = self._grant(ip, cast("dict[bytes, bytes]", fields))
                            if grant.live(now):
                                grants.append(grant)
        except _ERRORS as exc:
            raise self._error("cannot list grants", exc) from None
        grants.sort(key=lambda g: (g.opened_at, g.ip))
        return grants

    def close(self) -> None:
        """Close the client if this store made it (from_url); a shared client stays open."""
        if self._owns_client:
            try:
                if self._client is not None:
                    self._client.close()
                if self._on_close is not None:
                    self._on_close()
            except _ERRORS:
                pass
