"""Client addresses: parsing, validation and the one canonical text form.

Theory of operation
-------------------
Every address that reaches a store (a spool file name, an SQL key, a Redis
key) goes through :func:`parse_ip` first. It accepts exactly the textual forms
of RFC 4291 section 2.2 (IPv6) and dotted-quad IPv4 as ``inet_pton(3)`` does,
folds IPv4-mapped IPv6 (``::ffff:1.2.3.4``, any case) to plain IPv4, and
prints IPv6 in the RFC 5952 canonical form (lower case, no leading zeros, the
longest run of two or more zero groups compressed, no embedded dotted quad).

Zone ids (``fe80::1%eth0``), slashes, ``..``, empty strings, surrounding
whitespace and anything else are refused with :class:`InvalidAddress`.

One host owns a whole IPv6 network (a /64 at least, RFC 6177), so per-address
limits (connections, login failures) count an IPv6 client under its network:
:func:`client_group` maps an address to the key it is counted under, with the
prefix length from ``ipv6_prefix`` (:data:`DEFAULT_IPV6_PREFIX`). Relay windows
stay per address: only limits are grouped.

This module deliberately imports only the C ``_socket`` module, and that only
for IPv6 (IPv4 is parsed here, exactly as glibc's ``inet_pton`` does: four
decimal parts, no leading zeros, each <= 255): importing ``ipaddress`` cost
22 ms (16-22 ms) and ``_socket`` 0.8 ms (0.8-0.9 ms, one outlier at 9 ms)
(``python -X importtime``, five runs, on the shared 2-core test machine under
load, December 2026), which ``relay-ctrl-check`` would pay on every SMTP
connection.
"""

from __future__ import annotations

from relaygate.errors import InvalidAddress

#: Longest textual address we look at (a full IPv6 with embedded IPv4 is 45
#: characters); anything longer is refused before parsing.
MAX_ADDRESS_LENGTH = 64

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

#: IPv6 clients are counted per /64 for limits: the smallest network a site gets
DEFAULT_IPV6_PREFIX = 64
#: prefix lengths accepted for that grouping; shorter than /32 (a whole provider's
#: allocation) would make strangers share one budget, longer than /128 means nothing
IPV6_PREFIX_RANGE = (32, 128)


def check_ipv6_prefix(value: object) -> int:
    """``value`` as a prefix length for :func:`client_group`; ValueError when unusable."""
    low, high = IPV6_PREFIX_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"IPv6 prefix length must be a whole number from {low} to {high}")
    return value


def client_group(ip: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The key a client address is counted under for per-address limits.

    IPv4 is its own key. IPv6 is the network of its first ``ipv6_prefix`` bits
    in canonical form with the length, ``2001:db8:1:2::/64`` (the address itself
    at /128); IPv4-mapped IPv6 is folded to IPv4 first. Text that is not an
    address (``unix`` for a local socket) is returned unchanged: it is a key too.
    """
    if ":" not in ip:
        return ip
    check_ipv6_prefix(ipv6_prefix)
    try:
        canonical = parse_ip(ip)
    except InvalidAddress:
        return ip
    if ":" not in canonical:  # was IPv4-mapped
        return canonical
    if ipv6_prefix == 128:
        return canonical
    raw = packed(canonical)
    whole, bits = divmod(ipv6_prefix, 8)
    net = bytearray(raw[:whole]) + bytes(16 - whole)
    if bits:
        net[whole] = raw[whole] & (0xFF << (8 - bits)) & 0xFF
    return f"{format_ipv6(bytes(net))}/{ipv6_prefix}"


def parse_ip(value: str | bytes) -> str:
    """Return the canonical text form of a client address, or raise InvalidAddress."""
    if isinstance(value, bytes):
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidAddress(value, "not ASCII") from None
    elif isinstance(value, str):
        text = value
    else:
        raise InvalidAddress(value, "not a string")
    if not text:
        raise InvalidAddress(value, "empty")
    if len(text) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(value, "too long")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        if "%" in text:
            raise InvalidAddress(value, "zone ids are not accepted")
        import _socket

        try:
            packed = _socket.inet_pton(_socket.AF_INET6, text)
        except (OSError, ValueError):
            raise InvalidAddress(value) from None
        if packed[:12] == _MAPPED_PREFIX:
            return ".".join(str(b) for b in packed[12:])
        return format_ipv6(packed)
    if not _is_ipv4(text):
        raise InvalidAddress(value)
    return text  # valid dotted-quad text is already canonical (no leading zeros)


def _is_ipv4(text: str) -> bool:
    """glibc ``inet_pton(AF_INET)``: exactly a.b.c.d, ASCII digits, no leading zeros."""
    parts = text.split(".")
    if len(parts) != 4 or not text.isascii():
        return False
    for part in parts:
        # isdigit() is False for "", so this also refuses empty parts
        if not part.isdigit() or len(part) > 3 or (part[0] == "0" and len(part) > 1):
            return False
        if int(part) > 255:
            return False
    return True


def format_ipv6(packed: bytes) -> str:
    """RFC 5952 text of a 16-byte IPv6 address (no dotted-quad tail)."""
    groups = [(packed[i] << 8) | packed[i + 1] for i in range(0, 16, 2)]
    best_start, best_len = -1, 0
    run_start, run_len = -1, 0
    for i, g in enumerate(groups):
        if g == 0:
            if run_start < 0:
                run_start, run_len = i, 1
            else:
                run_len += 1
            if run_len > best_len:
                best_start, best_len = run_start, run_len
        else:
            run_start, run_len = -1, 0
    if best_len < 2:
        return ":".join(f"{g:x}" for g in groups)
    head = ":".join(f"{g:x}" for g in groups[:best_start])
    tail = ":".join(f"{g:x}" for g in groups[best_start + best_len :])
    return f"{head}::{tail}"


def require_canonical(ip: str) -> str:
    """Return ``ip`` if it is already canonical, else raise InvalidAddress.

    Stores call this before an address becomes a file name or a key: callers
    must pass :func:`parse_ip` output, and anything else is refused, not fixed.
    """
    if parse_ip(ip) != ip:
        raise InvalidAddress(ip, "not in canonical form")
    return ip


def is_loopback(canonical: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (canonical forms only)."""
    return canonical.startswith("127.") or canonical == "::1"


def packed(canonical: str) -> bytes:
    """The network-order bytes of a canonical address (4 or 16 bytes)."""
    import _socket

    family = _socket.AF_INET6 if ":" in canonical else _socket.AF_INET
    return _socket.inet_pton(family, canonical)
