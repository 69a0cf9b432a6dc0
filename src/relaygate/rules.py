"""Static relay rules: the tcprules text format, plus CIDR lines.

Theory of operation
-------------------
A rules file is what qmail admins already feed to ``tcprules``::

    # comment
    127.0.0.1:allow,RELAYCLIENT=""
    10.0.0.:allow,RELAYCLIENT=""          # prefix: 10.0.0.0/24
    192.168.1.5-9:allow,RELAYCLIENT="@fixup"   # range in the last part
    1.2.3.4:deny
    2001:db8::/32:allow,RELAYCLIENT=""    # CIDR, IPv4 or IPv6 (relaygate)
    [2001:db8::1]:allow,RELAYCLIENT=""    # an exact IPv6 address
    :allow                                # the default

Each line is ``address:instructions``; the instructions start with ``allow``
or ``deny`` and go on with ``,VAR="value"`` or ``,VAR='value'``. Because an
IPv6 address contains colons, the separator is the first ``:allow`` or
``:deny`` (neither word can occur inside an address).

Lookup follows tcpserver: the exact address first, then the longest matching
prefix (tcprules prefixes count as /8, /16, /24; CIDR lines by their length),
then the default line. When one address appears twice, the first line wins,
as in ``tcprules``. The prefixes are kept in one hash table per prefix length,
so a lookup costs one probe per distinct length, however many networks a site
lists (a decision is made for every policy request and SMTP session).

A rule *allows relaying* only when it sets ``RELAYCLIENT`` (that is what
qmail-smtpd looks at); ``allow`` alone only lets the client connect. ``deny``
refuses the client: no relaying, whatever grants say.
"""

from __future__ import annotations

import _socket
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from relaygate.addresses import parse_ip
from relaygate.errors import ConfigError, InvalidAddress

#: tcprules lines longer than this are certainly not hand-written rules.
MAX_RULE_LINE = 4096

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    """One line of a rules file."""

    pattern: str
    allow: bool
    env: dict[str, str] = field(default_factory=dict)
    source: str = "<rules>"
    line: int = 0

    @property
    def relays(self) -> bool:
        """True when a match lets the client relay (allow + RELAYCLIENT)."""
        return self.allow and "RELAYCLIENT" in self.env

    @property
    def relayclient(self) -> str | None:
        return self.env.get("RELAYCLIENT") if self.relays else None

    def describe(self) -> str:
        shown = self.pattern if self.pattern else "(default)"
        return f"{self.source}:{self.line} {shown}"


@dataclass
class RuleSet:
    """A parsed rules file; immutable after :meth:`parse`."""

    exact: dict[str, Rule] = field(default_factory=dict)
    # (network, rule) sorted by prefix length, longest first.
    networks: list[tuple[_IPNetwork, Rule]] = field(default_factory=list)
    default: Rule | None = None
    count: int = 0
    #: ``networks`` for lookup, built on first use: per IP version, a list of
    #: (host bits, {network number >> host bits: rule}), longest prefix first.
    _tables: dict[int, list[tuple[int, dict[int, Rule]]]] | None = field(
        default=None, repr=False, compare=False)

    @classmethod
    def empty(cls) -> RuleSet:
        return cls()

    @classmethod
    def load(cls, path: str | Path) -> RuleSet:
        """Parse a rules text file; a ConfigError names the file, line and text."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("rules file not found", source=str(p)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read rules file ({exc})", source=str(p)) from None
        return cls.parse(text, str(p))

    @classmethod
    def parse(cls, text: str, source: str = "<rules>",
              errors: list[ConfigError] | None = None) -> RuleSet:
        """Parse rules text; the first bad line raises ConfigError.

        With an ``errors`` list, every bad line is appended to it instead and
        skipped (``relaygate rules validate`` reports them all at once).
        """
        rs = cls()
        nets: list[tuple[_IPNetwork, Rule]] = []
        seen_nets: set[_IPNetwork] = set()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if len(line) > MAX_RULE_LINE:
                    raise ConfigError("rule line too long", source=source, line=lineno)
                address, allow, env = _split_rule(line, source, lineno)
                expanded = _expand_address(address, source, lineno) if address else []
            except ConfigError as exc:
                if errors is None:
                    raise
                errors.append(exc)
                continue
            rule = Rule(address, allow, env, source, lineno)
            rs.count += 1
            if address == "":
                if rs.default is None:
                    rs.default = rule
                continue
            for kind, value in expanded:
                if kind == "exact":
                    assert isinstance(value, str)
                    rs.exact.setdefault(value, rule)
                else:
                    assert not isinstance(value, str)
                    if value not in seen_nets:
                        seen_nets.add(value)
                        nets.append((value, rule))
        # Stable sort keeps file order among equal lengths: the first line wins.
        nets.sort(key=lambda item: -item[0].prefixlen)
        rs.networks = nets
        return rs

    def match(self, ip: str) -> Rule | None:
        """The rule that applies to a canonical address, or None."""
        rule = self.exact.get(ip)
        if rule is not None:
            return rule
        if self.networks:
            tables = self._tables
            if tables is None:
                tables = self._tables = _prefix_tables(self.networks)
            if ":" in ip:
                version, number = 6, int.from_bytes(_socket.inet_pton(_socket.AF_INET6, ip))
            else:
                version, number = 4, int.from_bytes(_socket.inet_aton(ip))
            for host_bits, table in tables[version]:
                found = table.get(number >> host_bits)
                if found is not None:
                    return found
        return self.default

    def __len__(self) -> int:
        return self.count


def _split_rule(line: str, source: str, lineno: int) -> tuple[str, bool, dict[str, str]]:
    cut = -1
    for word in (":allow", ":deny"):
        i = line.find(word)
        while i >= 0:
            end = i + len(word)
            if end == len(line) or line[end] in ", \t":
                break
            i = line.find(word, i + 1)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    if cut < 0:
        raise ConfigError(
            "rule must be ADDRESS:allow[,VAR=\"value\"...] or ADDRESS:deny",
            source=source, line=lineno, value=line,
        )
    address = line[:cut].strip()
    rest = line[cut + 1 :]
    allow = rest.startswith("allow")
    rest = rest[5 if allow else 4 :]
    env: dict[str, str] = {}
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch in " \t":
            i += 1
            continue
        if ch != ",":
            raise ConfigError("expected ',' between instructions", source=source, line=lineno,
                              value=line)
        i += 1
        eq = rest.find("=", i)
        if eq < 0:
            raise ConfigError("instruction must be VAR=\"value\"", source=source, line=lineno,
                              value=line)
        name = rest[i:eq].strip()
        if not name or not (name.replace("_", "a").isalnum() and name.isascii()):
            raise ConfigError("bad variable name in rule", source=source, line=lineno, value=name)
        if eq + 1 >= len(rest) or rest[eq + 1] not in "\"'":
            raise ConfigError("variable value must be quoted with \" or '", source=source,
                              line=lineno, value=line)
        quote = rest[eq + 1]
        close = rest.find(quote, eq + 2)
        if close < 0:
            raise ConfigError("unterminated quoted value", source=source, line=lineno, value=line)
        value = rest[eq + 2 : close]
        if any(ord(c) < 32 for c in value):
            raise ConfigError("control character in value", source=source, line=lineno,
                              value=value)
        env.setdefault(name, value)
        i = close + 1
    return address, allow, env


def _prefix_tables(networks: list[tuple[_IPNetwork, Rule]]
                   ) -> dict[int, list[tuple[int, dict[int, Rule]]]]:
    """Networks (longest prefix first, first line first) as hash tables per length."""
    by_length: dict[tuple[int, int], dict[int, Rule]] = {}
    for net, rule in networks:
        host_bits = net.max_prefixlen - net.prefixlen
        table = by_length.setdefault((net.version, host_bits), {})
        table.setdefault(int(net.network_address) >> host_bits, rule)
    tables: dict[int, list[tuple[int, dict[int, Rule]]]] = {4: [], 6: []}
    for (version, host_bits), table in sorted(by_length.items(), key=lambda kv: kv[0][1]):
        tables[version].append((host_bits, table))
    return tables


def _expand_address(
    address: str, source: str, lineno: int
) -> list[tuple[str, str | _IPNetwork]]:
    """Turn one rule address into exact addresses and networks."""
    if address.startswith("=") or address.startswith("@"):
        raise ConfigError("host-name and TCPREMOTEINFO rules are not supported (use addresses)",
                          source=source, line=lineno, value=address)
    if "/" in address:
        try:
            net = ipaddress.ip_network(address.strip("[]"), strict=False)
        except ValueError:
            raise ConfigError("bad CIDR network", source=source, line=lineno,
                              value=address) from None
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
            mapped = net.network_address.ipv4_mapped
            net = ipaddress.ip_network(f"{mapped}/{max(net.prefixlen - 96, 0)}", strict=False)
        return [("net", net)]
    if ":" in address or address.startswith("["):
        try:
            return [("exact", parse_ip(address))]
        except InvalidAddress:
            raise ConfigError("bad IPv6 address (use [addr] or CIDR)", source=source,
                              line=lineno, value=address) from None
    # IPv4 tcprules forms: 1.2.3.4, 1.2.3.4-7, 1.2.3., 1.2., 1., 1.2.3-5.
    is_prefix = address.endswith(".")
    parts = address[:-1].split(".") if is_prefix else address.split(".")
    if not 1 <= len(parts) <= 4 or (not is_prefix and len(parts) != 4) or (
        is_prefix and len(parts) == 4
    ):
        raise ConfigError("bad IPv4 address or prefix", source=source, line=lineno,
                          value=address)
    fixed: list[int] = []
    for part in parts[:-1]:
        fixed.append(_octet(part, address, source, lineno))
    last = parts[-1]
    if "-" in last:
        lo_s, hi_s = last.split("-", 1)
        lo, hi = _octet(lo_s, address, source, lineno), _octet(hi_s, address, source, lineno)
        if lo > hi:
            raise ConfigError("range goes backwards", source=source, line=lineno, value=address)
        lasts = list(range(lo, hi + 1))
    else:
        lasts = [_octet(last, address, source, lineno)]
    out: list[tuple[str, str | _IPNetwork]] = []
    for v in lasts:
        octets = [*fixed, v]
        if is_prefix:
            bits = 8 * len(octets)
            base = ".".join(str(o) for o in octets + [0] * (4 - len(octets)))
            out.append(("net", ipaddress.IPv4Network(f"{base}/{bits}")))
        else:
            out.append(("exact", ".".join(str(o) for o in octets)))
    return out


def _octet(text: str, address: str, source: str, lineno: int) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 3 or int(text) > 255:
        raise ConfigError("bad IPv4 address or prefix", source=source, line=lineno,
                          value=address)
    return int(text)
