"""The PROXY protocol, versions 1 and 2: bytes in, the client's address out.

Theory of operation
-------------------
A load balancer (HAProxy ``send-proxy`` / ``send-proxy-v2``, a cloud load
balancer) that forwards a TCP connection first sends one header naming the
connection it forwards; the client's own bytes follow (the specification is
HAProxy's ``doc/proxy-protocol.txt``, sections below refer to it):

- version 1 (section 2.1) is one text line of at most 107 bytes::

      PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\\r\\n
      PROXY TCP6 2001:db8::7 2001:db8::1 56324 25\\r\\n
      PROXY UNKNOWN ...\\r\\n

- version 2 (section 2.2) is binary: a 12-byte signature, a version/command
  byte (``0x21`` PROXY, ``0x20`` LOCAL), a family/transport byte, a 16-bit
  length, then the addresses (12 bytes for IPv4, 36 for IPv6, 216 for UNIX)
  and optional TLVs, which are skipped (nothing here needs them).

:func:`parse_header` takes the bytes received so far and answers
:class:`Incomplete` (wait for more; every byte so far belongs to the header,
so a caller may consume them), a :class:`ProxyHeader` (with the header's
length: what follows it is the client's), or raises :class:`ProxyHeaderError`.
It decides as early as it can: a first byte that starts neither signature is
refused at once, not after a timeout.

What counts as "the proxy's own connection" (:attr:`ProxyHeader.local`): a v2
LOCAL command (health checks), v1 ``UNKNOWN``, and v2 PROXY with an unspecified
or UNIX family. The specification says the receiver then uses the real
connection's endpoints; the caller does so, and opens nothing for them.

Strictness: v1 addresses must be in the form the specification prescribes
(dotted quad without leading zeros, IPv6 text as ``inet_pton`` takes it), ports
decimal without leading zeros, single spaces, CRLF. v2 must name a stream
transport (a UDP header on a TCP listener is refused) and carry at least the
address block its family needs. The addresses come out canonical
(:func:`relaygate.addresses.parse_ip`: IPv4-mapped IPv6 folded to IPv4).
"""

from __future__ import annotations

from dataclasses import dataclass

from relaygate.addresses import parse_ip
from relaygate.errors import InvalidAddress, RelaygateError

#: Section 2.1: "a 108-byte buffer is always enough to store all the line and a
#: trailing zero": the longest valid v1 line, CRLF included, is 107 bytes.
V1_MAX_LENGTH = 107
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: signature, version/command, family/transport, 16-bit length
V2_FIXED_LENGTH = 16
#: The most a v2 header may carry after its fixed part. The format allows 65535,
#: but HAProxy's largest TLV set (ALPN, authority, unique id of at most 128 bytes,
#: the SSL TLVs with a client certificate's CN) stays far below this: the limit
#: bounds what a broken or hostile proxy can make us buffer per connection.
V2_MAX_PAYLOAD = 4096
#: The most bytes any header can take; a reader never needs to look further.
MAX_HEADER_LENGTH = V2_FIXED_LENGTH + V2_MAX_PAYLOAD

_V2_COMMAND_LOCAL = 0x0
_V2_COMMAND_PROXY = 0x1
_V2_FAMILY_UNSPEC = 0x0
_V2_FAMILY_INET = 0x1
_V2_FAMILY_INET6 = 0x2
_V2_FAMILY_UNIX = 0x3
_V2_TRANSPORT_UNSPEC = 0x0
_V2_TRANSPORT_STREAM = 0x1
#: address block length by family (section 2.2: ``struct proxy_addr``)
_V2_ADDRESS_LENGTH = {_V2_FAMILY_INET: 12, _V2_FAMILY_INET6: 36, _V2_FAMILY_UNIX: 216}


class ProxyHeaderError(RelaygateError):
    """The bytes are not a valid PROXY header; the connection must be closed."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True, slots=True)
class Incomplete:
    """More bytes are needed; ``at_least`` is the smallest total length worth waiting for."""

    at_least: int


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: who the proxied client is, and how long the header was."""

    version: int
    #: bytes the header took; the client's data starts there
    length: int
    #: the connection is the proxy's own (LOCAL, UNKNOWN, UNSPEC, UNIX): use its endpoints
    local: bool
    #: the client's canonical address and port (None when ``local``)
    source: tuple[str, int] | None = None
    #: the address and port the client connected to (None when ``local``)
    destination: tuple[str, int] | None = None


def parse_header(data: bytes | bytearray | memoryview) -> Incomplete | ProxyHeader:
    """Parse the PROXY header at the start of ``data`` (see the module docstring)."""
    view = bytes(data[:MAX_HEADER_LENGTH])
    if not view:
        return Incomplete(1)
    if view[0] == V1_PREFIX[0]:
        return _parse_v1(view)
    if view[0] == V2_SIGNATURE[0]:
        return _parse_v2(view)
    raise ProxyHeaderError("no PROXY protocol signature")


def header_part(seen: bytes | bytearray, peeked: bytes) -> tuple[int, ProxyHeader | None]:
    """For a reader that peeks: how many of the ``peeked`` bytes (those after the ``seen``
    ones already taken) belong to the header, and the header once it is complete.

    A reader takes exactly that many bytes off the socket, so what follows the header
    stays for the protocol (or the TLS layer). Raises ProxyHeaderError.
    """
    result = parse_header(bytes(seen) + peeked)
    if isinstance(result, Incomplete):
        return len(peeked), None  # an incomplete header: every byte so far is header
    return result.length - len(seen), result


def _parse_v1(data: bytes) -> Incomplete | ProxyHeader:
    head = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyHeaderError("no PROXY protocol signature")
    end = data.find(b"\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        if b"\r" in data[:-1]:
            raise ProxyHeaderError("PROXY v1 line with a bare CR")
        return Incomplete(len(data) + 1)
    if end == 0 or data[end - 1] != 0x0D or b"\r" in data[: end - 1]:
        raise ProxyHeaderError("PROXY v1 line must end with CRLF")
    length = end + 1
    line = data[len(V1_PREFIX) : end - 1]
    fields = line.split(b" ")
    family = fields[0]
    if family == b"UNKNOWN":
        # Section 2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(1, length, True)
    if family not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1 family must be TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        raise ProxyHeaderError("PROXY v1 line needs two addresses and two ports")
    want_v6 = family == b"TCP6"
    src = _v1_address(fields[1], want_v6)
    dst = _v1_address(fields[2], want_v6)
    return ProxyHeader(1, length, False, (src, _v1_port(fields[3])), (dst, _v1_port(fields[4])))


def _v1_address(raw: bytes, want_v6: bool) -> str:
    is_v6 = b":" in raw
    if is_v6 != want_v6:
        raise ProxyHeaderError("PROXY v1 address does not match its family")
    try:
        return parse_ip(raw)
    except InvalidAddress:
        raise ProxyHeaderError("PROXY v1 address is not valid") from None


def _v1_port(raw: bytes) -> int:
    # decimal, 0..65535, no sign, no leading zero (section 2.1)
    if not raw.isdigit() or len(raw) > 5 or (raw[:1] == b"0" and len(raw) > 1):
        raise ProxyHeaderError("PROXY v1 port is not valid")
    port = int(raw)
    if port > 65535:
        raise ProxyHeaderError("PROXY v1 port is out of range")
    return port


def _parse_v2(data: bytes) -> Incomplete | ProxyHeader:
    sig = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(sig):
        raise ProxyHeaderError("no PROXY protocol signature")
    if len(data) < V2_FIXED_LENGTH:
        # check the version byte as soon as it is there
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyHeaderError("PROXY v2 header with an unknown version")
        return Incomplete(V2_FIXED_LENGTH)
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError("PROXY v2 header with an unknown version")
    if command not in (_V2_COMMAND_LOCAL, _V2_COMMAND_PROXY):
        raise ProxyHeaderError("PROXY v2 header with an unknown command")
    family, transport = data[13] >> 4, data[13] & 0x0F
    payload = int.from_bytes(data[14:16], "big")
    if payload > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"PROXY v2 header longer than {V2_MAX_PAYLOAD} bytes")
    if family not in (_V2_FAMILY_UNSPEC, *_V2_ADDRESS_LENGTH):
        raise ProxyHeaderError("PROXY v2 header with an unknown address family")
    if transport not in (_V2_TRANSPORT_UNSPEC, _V2_TRANSPORT_STREAM) and \
            command == _V2_COMMAND_PROXY:
        raise ProxyHeaderError("PROXY v2 header for a datagram transport")
    needed = _V2_ADDRESS_LENGTH.get(family, 0)
    if command == _V2_COMMAND_PROXY and payload < needed:
        raise ProxyHeaderError("PROXY v2 address block shorter than its family needs")
    length = V2_FIXED_LENGTH + payload
    if len(data) < length:
        return Incomplete(length)
    if command == _V2_COMMAND_LOCAL or family in (_V2_FAMILY_UNSPEC, _V2_FAMILY_UNIX) \
            or transport == _V2_TRANSPORT_UNSPEC:
        # Section 2.2: LOCAL and UNSPEC mean "use the real connection endpoints".
        return ProxyHeader(2, length, True)
    block = data[V2_FIXED_LENGTH : V2_FIXED_LENGTH + needed]
    size = 4 if family == _V2_FAMILY_INET else 16
    src = _v2_address(block[:size])
    dst = _v2_address(block[size : 2 * size])
    src_port = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    dst_port = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    return ProxyHeader(2, length, False, (src, src_port), (dst, dst_port))


def _v2_address(packed: bytes) -> str:
    if len(packed) == 4:
        return ".".join(str(b) for b in packed)
    text = ":".join(packed[i : i + 2].hex() for i in range(0, 16, 2))
    return parse_ip(text)  # canonical RFC 5952 form; IPv4-mapped folded to IPv4


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 header (``UNKNOWN`` when either end is None); for tests and benchmarks."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP6" if ":" in source[0] else "TCP4"
    line = f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    return line.encode("ascii")


def build_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None,
             *, local: bool = False, tlvs: bytes = b"") -> bytes:
    """A v2 header (LOCAL when ``local``; UNSPEC when an end is None); for tests."""
    import ipaddress

    command = _V2_COMMAND_LOCAL if local else _V2_COMMAND_PROXY
    if local or source is None or destination is None:
        fam_byte, block = (_V2_FAMILY_UNSPEC << 4) | _V2_TRANSPORT_UNSPEC, b""
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        family = _V2_FAMILY_INET6 if src.version == 6 else _V2_FAMILY_INET
        fam_byte = (family << 4) | _V2_TRANSPORT_STREAM
        block = (src.packed + dst.packed + source[1].to_bytes(2, "big")
                 + destination[1].to_bytes(2, "big"))
    payload = block + tlvs
    return (V2_SIGNATURE + bytes([0x20 | command, fam_byte])
            + len(payload).to_bytes(2, "big") + payload)
