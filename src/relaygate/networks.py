"""A small set of networks (``192.0.2.0/24``, ``2001:db8::/32``, single addresses).

Used for the trusted proxies: the load balancers whose PROXY header is believed
and for whose own addresses no relay window is ever opened. Lookups take a
canonical address (:func:`relaygate.addresses.parse_ip` output) and compare
integers, one per network: the lists are short (a few load balancers).

Parsing uses :mod:`ipaddress` (only when a list is given, so the chain programs
that never configure one do not pay its import).
"""

from __future__ import annotations

from collections.abc import Iterable

from relaygate.addresses import packed
from relaygate.errors import ConfigError


class Networks:
    """Networks to test canonical addresses against (``ip in networks``)."""

    __slots__ = ("_nets", "specs")

    def __init__(self, specs: Iterable[str] = (), *, source: str | None = None) -> None:
        #: the networks as given, normalised (``10.0.0.0/8``), for messages and docs
        self.specs: tuple[str, ...] = ()
        #: (version, network number, host bits)
        self._nets: tuple[tuple[int, int, int], ...] = ()
        items = list(specs)
        if not items:
            return
        import ipaddress

        nets = []
        shown = []
        for spec in items:
            try:
                net = ipaddress.ip_network(str(spec).strip(), strict=True)
            except ValueError as exc:
                why = "host bits set" if "host bits" in str(exc) else "not an address or CIDR"
                raise ConfigError(f"trusted proxy: {why}", source=source, value=spec) from None
            if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
                # ::ffff:192.0.2.0/120 names IPv4 addresses, which are folded to IPv4
                mapped = net.network_address.ipv4_mapped
                net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
            host_bits = net.max_prefixlen - net.prefixlen
            nets.append((net.version, int(net.network_address) >> host_bits, host_bits))
            shown.append(str(net))
        self._nets = tuple(nets)
        self.specs = tuple(shown)

    def __bool__(self) -> bool:
        return bool(self._nets)

    def __contains__(self, canonical: object) -> bool:
        if not self._nets or not isinstance(canonical, str):
            return False
        raw = packed(canonical)
        version = 6 if len(raw) == 16 else 4
        number = int.from_bytes(raw, "big")
        return any(v == version and number >> bits == net for v, net, bits in self._nets)

    def __repr__(self) -> str:
        return f"Networks({list(self.specs)!r})"
