"""Outbound routing: qmail's smtproutes first, then MX, then the domain's own address.

Theory of operation
-------------------
For each recipient domain the delivery worker asks :meth:`Routes.lookup` for a
static route, then :func:`resolve_targets` turns the route (or the lack of
one) into an ordered list of :class:`Target` addresses to try.

``smtproutes`` has qmail's ``control/smtproutes`` format, one route a line::

    example.com:mx.example.net        # mail for example.com goes to mx.example.net:25
    example.com:mx.example.net:2525   # ... on port 2525
    .example.com:relay.example.net    # any subdomain of example.com (not example.com itself)
    lists.example.com:                # empty relay: use MX for this domain after all
    :smarthost.example.net            # everything else (the default route)
    :[::1]:2525                       # IPv6 relays (and any IP literal) in brackets

Blank lines and ``#`` comments are ignored. As qmail-remote does, the lookup
tries the whole domain, then each parent suffix starting with a dot
(``.b.example.com``, ``.example.com``, ``.com``), then the default route; the
first line for a given key wins (TOML ``smtproutes`` lines are read before
``smtproutes_file``, so they override it). A relay host is resolved with
A/AAAA only, never MX, as in qmail; if it has no address the delivery is
deferred (a typo in the configuration must not bounce mail).

Without a static route (RFC 5321 section 5.1):

* MX records are sorted by preference; hosts of equal preference are shuffled.
* A "null MX" (RFC 7505: one record ``0 .``) means the domain accepts no mail:
  every recipient fails at once with ``556 5.1.10``.
* No MX records: the domain's own A/AAAA records are the target ("implicit MX").
* If our own host name is among the MX hosts, only more preferred hosts are
  used (section 5.1: "the SMTP client MUST ... discard all records with an
  equal or greater preference"); none left means a routing loop (permanent).
* NXDOMAIN is permanent; DNS timeouts and SERVFAIL (dnspython's
  NoNameservers) are temporary.
* Within one host, IPv4 addresses are tried before IPv6 ones; at most
  ``MAX_TARGETS`` addresses are tried per delivery.

The resolver is injectable (:class:`Resolver`): :class:`DnsPythonResolver`
wraps dnspython's asyncio resolver; :class:`StaticResolver` answers from
dictionaries (tests and benchmarks, so they never touch real DNS).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from relaygate.errors import ConfigError, RelaygateError

if TYPE_CHECKING:
    import dns.asyncresolver

    from relaygate.config import Settings

#: SMTP's well-known port (RFC 5321 section 4.5.4.2 / IANA)
SMTP_PORT = 25
#: at most this many MX hosts are looked up: bounds DNS work per delivery (Postfix uses 5)
MAX_MX_HOSTS = 10
#: at most this many addresses are tried per delivery: bounds the time one bad domain costs
MAX_TARGETS = 10
#: a DNS query's whole budget (all servers, all retries); longer counts as a temporary failure
DNS_TIMEOUT = 20.0
#: RFC 1035 section 2.3.4: a domain name is at most 255 octets
MAX_DOMAIN = 255

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_\-\u0080-\U0010ffff]{1,63}(?<!-)")


@dataclass(frozen=True)
class Relay:
    """A static next hop: host name or IP literal, and port."""

    host: str
    port: int = SMTP_PORT

    @property
    def literal(self) -> bool:
        return _is_ip(self.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SMTP_PORT else f"{host}:{self.port}"


@dataclass(frozen=True)
class Route:
    """One smtproutes line. ``relay`` None means "use MX" (qmail's empty relay)."""

    key: str
    relay: Relay | None
    origin: str = ""


@dataclass(frozen=True)
class Target:
    """One address to connect to; ``host`` is the name used for TLS SNI and in DSNs."""

    host: str
    address: str
    port: int = SMTP_PORT


class RoutingError(RelaygateError):
    """No usable next hop: ``permanent`` decides bounce or retry.

    ``code``/``status``/``text`` are what the DSN's Diagnostic-Code shows, as if
    a server had answered (the Postfix convention for local decisions).
    """

    def __init__(self, code: int, status: str, text: str, *, permanent: bool) -> None:
        self.code = code
        self.status = status
        self.text = text
        self.permanent = permanent
        super().__init__(f"{code} {status} {text}")


class DnsError(RelaygateError):
    """A DNS query failed: ``permanent`` for NXDOMAIN, otherwise a temporary failure."""

    def __init__(self, name: str, rdtype: str, why: str, *, permanent: bool) -> None:
        self.name = name
        self.rdtype = rdtype
        self.why = why
        self.permanent = permanent
        super().__init__(f"{name}/{rdtype}: {why}")


class Resolver(Protocol):
    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """(preference, host) pairs; ``[]`` when the name exists without MX records.

        The null MX target is returned as ``"."``. Raises DnsError.
        """
        ...

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``; ``[]`` when it has none. Raises DnsError."""
        ...


# -- smtproutes ----------------------------------------------------------------


class Routes:
    """Parsed smtproutes: exact domains, ``.suffix`` keys and the default ``""`` key."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._map: dict[str, Route] = {}
        for r in routes:
            self._map.setdefault(r.key, r)

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._map.values())

    @classmethod
    def parse(cls, lines: Iterable[str], *, source: str, first_line: int = 1) -> Routes:
        """Parse smtproutes lines; a bad line raises ConfigError naming source, line and text."""
        routes = []
        for n, raw in enumerate(lines, first_line):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            routes.append(parse_line(line, source=source, line=n))
        return cls(routes)

    @classmethod
    def from_settings(cls, settings: Settings) -> Routes:
        """TOML ``smtproutes`` lines first, then ``smtproutes_file`` (missing file: error)."""
        routes = list(cls.parse(settings.smtproutes, source="setting smtproutes"))
        if settings.smtproutes_file is not None:
            path = Path(settings.smtproutes_file)
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ConfigError("smtproutes file not found", source=str(path)) from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read smtproutes file ({exc})",
                                  source=str(path)) from None
            routes.extend(cls.parse(text.splitlines(), source=str(path)))
        return cls(routes)

    def lookup(self, domain: str) -> Route | None:
        """The route for ``domain``: exact key, then ``.parent`` suffixes, then default."""
        d = domain.lower().rstrip(".")
        hit = self._map.get(d)
        if hit is not None:
            return hit
        i = d.find(".")
        while i != -1:
            hit = self._map.get(d[i:])
            if hit is not None:
                return hit
            i = d.find(".", i + 1)
        return self._map.get("")


def parse_line(text: str, *, source: str = "smtproutes", line: int | None = None) -> Route:
    """Parse one ``domain:relay[:port]`` line (see the module docstring)."""
    origin = f"{source}:{line}" if line is not None else source

    def bad(why: str) -> ConfigError:
        return ConfigError(f"bad smtproutes line: {why}", source=source, line=line, value=text)

    key, sep, rest = text.partition(":")
    if not sep:
        raise bad("expected domain:relay[:port]")
    key = key.strip().lower()
    if key and not _valid_domain(key[1:] if key.startswith(".") else key):
        raise bad("bad domain")
    rest = rest.strip()
    if not rest:
        return Route(key, None, origin)
    if rest.startswith("["):
        host, close, tail = rest[1:].partition("]")
        if not close:
            raise bad("missing ] after IP literal")
        host = host.removeprefix("IPv6:").removeprefix("ipv6:")
        if not _is_ip(host):
            raise bad("bracketed relay must be an IP address")
        if tail and not tail.startswith(":"):
            raise bad("expected :port after ]")
        port_s = tail[1:] if tail else ""
        host = str(ipaddress.ip_address(host))
    else:
        host, _, port_s = rest.partition(":")
        host = host.strip().lower().rstrip(".")
        if ":" in port_s:
            raise bad("write IPv6 relays in brackets: [::1]:25")
        if not (_is_ip(host) or _valid_domain(host)):
            raise bad("bad relay host")
        if _is_ip(host):
            host = str(ipaddress.ip_address(host))
    port = SMTP_PORT
    if port_s.strip():
        if not port_s.strip().isdigit() or not 0 < int(port_s) <= 65535:
            raise bad("bad port")
        port = int(port_s)
    return Route(key, Relay(host, port), origin)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def _valid_domain(d: str) -> bool:
    if not d or len(d.encode("utf-8", "surrogatepass")) > MAX_DOMAIN:
        return False
    return all(_LABEL.fullmatch(label) for label in d.split("."))


# -- resolution ----------------------------------------------------------------


async def resolve_targets(
    domain: str,
    route: Route | None,
    resolver: Resolver,
    *,
    local_names: Sequence[str] = (),
    rng: random.Random | None = None,
    port: int = SMTP_PORT,
) -> list[Target]:
    """Ordered targets for ``domain`` (see the module docstring). Raises RoutingError.

    ``port`` is the port of MX and implicit-MX targets (25; tests use a loopback sink).
    """
    if route is not None and route.relay is not None:
        return await _relay_targets(route.relay, resolver)
    literal = _domain_literal(domain)
    if literal is not None:
        return [Target(literal, literal, port)]
    if not _valid_domain(domain):
        raise RoutingError(550, "5.1.2", f"bad destination domain {domain!r}", permanent=True)
    try:
        records = await resolver.mx(domain)
    except DnsError as exc:
        raise _dns_failure(domain, exc) from None
    if not records:
        return await _implicit_mx(domain, resolver, port)
    real = [(p, h.lower().rstrip(".")) for p, h in records if h.rstrip(".") != ""]
    if not real:
        # RFC 7505 section 4.1: the domain has declared that it accepts no mail.
        raise RoutingError(556, "5.1.10", f"recipient domain {domain} has a null MX",
                           permanent=True)
    real.sort(key=lambda r: r[0])
    locals_ = {n.lower().rstrip(".") for n in local_names if n}
    mine = [p for p, h in real if h in locals_]
    if mine:
        # RFC 5321 section 5.1: we are an MX; only better ones may be used.
        real = [(p, h) for p, h in real if p < min(mine)]
        if not real:
            raise RoutingError(554, "5.4.6", f"mail for {domain} loops back to myself",
                               permanent=True)
    hosts = _shuffle_equal(real, rng or random.Random())[:MAX_MX_HOSTS]
    targets: list[Target] = []
    temp: DnsError | None = None
    for host in hosts:
        try:
            addrs = await resolver.addresses(host)
        except DnsError as exc:
            if not exc.permanent:
                temp = exc
            continue
        targets.extend(Target(host, a, port) for a in addrs)
        if len(targets) >= MAX_TARGETS:
            break
    if targets:
        return targets[:MAX_TARGETS]
    if temp is not None:
        raise RoutingError(451, "4.4.3", f"cannot resolve the MX hosts of {domain}: {temp.why}",
                           permanent=False)
    raise RoutingError(550, "5.4.4", f"no MX host of {domain} has an address", permanent=True)


async def _relay_targets(relay: Relay, resolver: Resolver) -> list[Target]:
    if relay.literal:
        return [Target(relay.host, relay.host, relay.port)]
    try:
        addrs = await resolver.addresses(relay.host)
    except DnsError as exc:
        raise RoutingError(451, "4.4.3", f"cannot resolve relay {relay.host}: {exc.why}",
                           permanent=False) from None
    if not addrs:
        raise RoutingError(451, "4.4.3", f"relay {relay.host} has no address", permanent=False)
    return [Target(relay.host, a, relay.port) for a in addrs[:MAX_TARGETS]]


async def _implicit_mx(domain: str, resolver: Resolver, port: int) -> list[Target]:
    try:
        addrs = await resolver.addresses(domain)
    except DnsError as exc:
        raise _dns_failure(domain, exc) from None
    if not addrs:
        raise RoutingError(550, "5.1.2", f"domain {domain} has no MX and no address",
                           permanent=True)
    return [Target(domain, a, port) for a in addrs[:MAX_TARGETS]]


def _dns_failure(domain: str, exc: DnsError) -> RoutingError:
    if exc.permanent:
        return RoutingError(550, "5.1.2", f"domain {domain} not found ({exc.why})",
                            permanent=True)
    return RoutingError(451, "4.4.3", f"DNS lookup for {domain} failed ({exc.why})",
                        permanent=False)


def _domain_literal(domain: str) -> str | None:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` (RFC 5321 section 4.1.3) -> the address."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        raise RoutingError(550, "5.1.2", f"bad address literal {domain!r}",
                           permanent=True) from None


def _shuffle_equal(records: list[tuple[int, str]], rng: random.Random) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(records):
        j = i
        while j < len(records) and records[j][0] == records[i][0]:
            j += 1
        group = [h for _, h in records[i:j]]
        rng.shuffle(group)
        out.extend(h for h in group if h not in out)
        i = j
    return out


# -- resolvers -----------------------------------------------------------------


class DnsPythonResolver:
    """:class:`Resolver` over ``dns.asyncresolver`` (the system's resolv.conf by default)."""

    def __init__(self, resolver: dns.asyncresolver.Resolver | None = None, *,
                 timeout: float = DNS_TIMEOUT) -> None:
        # Built on first use: reading resolv.conf at start-up would make a host without
        # DNS fail even when every route is static.
        self._resolver = resolver
        self._timeout = timeout

    async def _query(self, name: str, rdtype: str) -> list[object]:
        import dns.asyncresolver
        import dns.exception
        import dns.name
        import dns.resolver

        if self._resolver is None:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                raise DnsError(name, rdtype, "no DNS resolver configured (resolv.conf)",
                               permanent=False) from None
        try:
            answer = await self._resolver.resolve(name, rdtype, lifetime=self._timeout,
                                                  search=False)
        except dns.resolver.NXDOMAIN:
            raise DnsError(name, rdtype, "NXDOMAIN (no such domain)", permanent=True) from None
        except dns.resolver.NoAnswer:
            return []
        except dns.resolver.NoNameservers:
            raise DnsError(name, rdtype, "SERVFAIL (no server answered)",
                           permanent=False) from None
        except dns.exception.Timeout:
            raise DnsError(name, rdtype, "timeout", permanent=False) from None
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel,
                dns.name.BadEscape, UnicodeError) as exc:
            raise DnsError(name, rdtype, f"bad name ({type(exc).__name__})",
                           permanent=True) from None
        except dns.exception.DNSException as exc:
            raise DnsError(name, rdtype, f"DNS error ({type(exc).__name__})",
                           permanent=False) from None
        return list(answer)

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        records = await self._query(domain, "MX")
        out: list[tuple[int, str]] = []
        for r in records:
            exchange = getattr(r, "exchange", None)
            pref = getattr(r, "preference", None)
            if exchange is None or not isinstance(pref, int):
                continue
            out.append((pref, exchange.to_text(omit_final_dot=True)))
        return out

    async def addresses(self, host: str) -> list[str]:
        results = await asyncio.gather(self._query(host, "A"), self._query(host, "AAAA"),
                                       return_exceptions=True)
        addrs: list[str] = []
        errors: list[DnsError] = []
        for res in results:
            if isinstance(res, DnsError):
                errors.append(res)
            elif isinstance(res, BaseException):
                raise res
            else:
                addrs.extend(str(getattr(r, "address", "")) for r in res)
        addrs = [a for a in addrs if a]
        if addrs:
            return addrs
        if errors:
            # Any temporary failure wins: the other family may exist once DNS answers.
            temp = [e for e in errors if not e.permanent]
            raise temp[0] if temp else errors[0]
        return []


@dataclass
class StaticResolver:
    """A :class:`Resolver` answering from dictionaries (tests, benchmarks).

    ``mx_records``: domain -> [(preference, host)]; ``hosts``: name -> addresses;
    ``failures``: name -> DnsError to raise (for MX and address queries). A name
    in neither dictionary is NXDOMAIN.
    """

    mx_records: Mapping[str, Sequence[tuple[int, str]]] = field(default_factory=dict)
    hosts: Mapping[str, Sequence[str]] = field(default_factory=dict)
    failures: Mapping[str, DnsError] = field(default_factory=dict)
    queries: list[tuple[str, str]] = field(default_factory=list)

    def _fail(self, name: str) -> None:
        if name in self.failures:
            raise self.failures[name]

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        d = domain.lower().rstrip(".")
        self.queries.append((d, "MX"))
        self._fail(d)
        if d in self.mx_records:
            return list(self.mx_records[d])
        if d in self.hosts:
            return []
        raise DnsError(d, "MX", "NXDOMAIN (no such domain)", permanent=True)

    async def addresses(self, host: str) -> list[str]:
        h = host.lower().rstrip(".")
        self.queries.append((h, "A/AAAA"))
        self._fail(h)
        if h in self.hosts:
            addrs = list(self.hosts[h])
            return sorted(addrs, key=lambda a: ":" in a)
        if h in self.mx_records:
            return []
        raise DnsError(h, "A", "NXDOMAIN (no such domain)", permanent=True)
