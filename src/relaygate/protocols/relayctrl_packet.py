"""relay-ctrl's UDP packet: encode, decode, sign, verify; replay guard. Sans-I/O.

Theory of operation
-------------------
relay-ctrl 3.1.1 ships ``packet.html``, a packet format its ``relay-ctrl-send``
and ``relay-ctrl-udp`` never implemented (they send the bare ASCII address,
unauthenticated; its to-do note asks for "a timestamp and a cryptographic signature
of all the rest of the packet + a secret"). relaygate speaks that format.
Byte by byte::

    offset 0        version             1 byte, 0x01
    then, repeated  item type           1 byte, 1..7 (never 0)
                    item length N       1 byte
                    item data           N bytes
    last            end marker          1 byte, 0x00 (type 0, END, has no length)

    whole packet at most 512 bytes (relay-ctrl: "UDP transmission limits")

    type  symbol     length  data
    0     END        -       (the terminating zero byte)
    1     REQUEST    0       flag: a request (sender -> receiver)
    2     RESPONSE   0       flag: a response (receiver -> sender)
    3     TIMESTAMP  1..32   ASCII decimal seconds since the epoch with a
                             fraction, e.g. "1700000000.123456"; a response
                             copies the request's timestamp byte for byte
    4     IPV4       4       the address, network byte order
    5     IPV6       16      the address, network byte order
    6     ENV        3..255  "NAME=VALUE" (relaygate sends USER and DOMAIN)
    7     SHA        32      SHA-256( every packet byte before this item's
                             type byte || the shared secret )

Example, a signed request for 192.0.2.7 by alice::

    01                               version
    01 00                            REQUEST
    03 11 "1700000000.123456"        TIMESTAMP (17 bytes)
    04 04 c0 00 02 07                IPV4
    06 0a "USER=alice"               ENV
    07 20 <32 bytes>                 SHA over the 41 bytes above + secret
    00                               END

Rules this decoder enforces (untrusted bytes stay bytes until they pass):
version 1; every item of a known type with its fixed length; exactly one of
REQUEST/RESPONSE; at most one TIMESTAMP and one address; a request carries
exactly one address and a timestamp; SHA, when present, is the last item;
exactly one END byte and nothing after it; ENV names are ``[A-Z0-9_]+`` and
values printable. The signature is the format's own construction (hash of the
data followed by the secret), compared in constant time.

Replay protection (:class:`ReplayGuard`, used when a secret is configured):
a packet whose timestamp is more than :data:`REPLAY_WINDOW` seconds in the
past (or the future) is refused, and so is one whose signature was already
seen within that window.

The C programs' packet (the bare ASCII dotted quad, answered by one byte) is
recognised by :func:`is_legacy` so a receiver without a secret still serves
old senders.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from relaygate.addresses import format_ipv6, packed, parse_ip
from relaygate.errors import InvalidAddress, RelaygateError

VERSION = 1

END = 0
REQUEST = 1
RESPONSE = 2
TIMESTAMP = 3
IPV4 = 4
IPV6 = 5
ENV = 6
SHA = 7

#: relay-ctrl's limit: "the total packet length is limited to 512 bytes".
MAX_PACKET = 512
#: Fixed item lengths (None: variable).
ITEM_LENGTH: dict[int, int | None] = {
    REQUEST: 0, RESPONSE: 0, TIMESTAMP: None, IPV4: 4, IPV6: 16, ENV: None, SHA: 32,
}
#: A timestamp longer than this is not seconds since the epoch with a sane fraction.
MAX_TIMESTAMP_TEXT = 32
#: Seconds a packet stays acceptable, and how long its signature is remembered.
REPLAY_WINDOW = 60.0
#: Signatures remembered at most (a 60 s window at ~1600 logins/s); when full,
#: new packets are refused rather than letting replays through.
MAX_REMEMBERED = 100_000
#: The one byte relay-ctrl-udp answers a legacy (bare ASCII address) packet with.
LEGACY_ACK = b"\x01"
#: Longest legacy packet: an IPv4 dotted quad (relay-ctrl allows 16 characters).
MAX_LEGACY = 16


class PacketError(RelaygateError, ValueError):
    """A packet that does not follow the format (the text says what is wrong)."""


@dataclass(frozen=True)
class Packet:
    """A decoded packet. ``signed_part`` is what the SHA item covers."""

    response: bool
    timestamp: bytes | None
    address: str | None
    env: tuple[tuple[str, str], ...]
    sha: bytes | None
    signed_part: bytes

    @property
    def signed(self) -> bool:
        return self.sha is not None

    def env_value(self, name: str) -> str | None:
        """The last value of an ENV item ``name`` (as putenv would leave it)."""
        found = None
        for key, value in self.env:
            if key == name:
                found = value
        return found

    def timestamp_value(self) -> float:
        """The timestamp as a number (PacketError when there is none)."""
        if self.timestamp is None:
            raise PacketError("no timestamp")
        return float(self.timestamp.decode("ascii"))


def _item(kind: int, data: bytes) -> bytes:
    if len(data) > 255:
        raise PacketError(f"item {kind} too long ({len(data)} bytes)")
    return bytes((kind, len(data))) + data


def sign(data: bytes, secret: bytes) -> bytes:
    """The SHA item's data: SHA-256 of the packet so far followed by the secret."""
    return hashlib.sha256(data + secret).digest()


def format_timestamp(now: float) -> bytes:
    """relay-ctrl's TIMESTAMP text: seconds with a microsecond fraction."""
    if now < 0:
        raise PacketError("negative timestamp")
    return f"{now:.6f}".encode("ascii")


def _address_item(address: str) -> bytes:
    raw = packed(parse_ip(address))
    return _item(IPV6 if len(raw) == 16 else IPV4, raw)


def _finish(body: bytes, secret: bytes | None) -> bytes:
    if secret is not None:
        body += _item(SHA, sign(body, secret))
    packet = body + bytes((END,))
    if len(packet) > MAX_PACKET:
        raise PacketError(f"packet too long ({len(packet)} > {MAX_PACKET} bytes)")
    return packet


def encode_request(
    address: str,
    *,
    now: float,
    env: Mapping[str, str] | None = None,
    secret: bytes | None = None,
) -> bytes:
    """A request granting ``address`` (any text form; canonicalised) with ENV items."""
    body = bytes((VERSION,)) + _item(REQUEST, b"") + _item(TIMESTAMP, format_timestamp(now))
    body += _address_item(address)
    for name, value in (env or {}).items():
        _check_env_name(name.encode("ascii", "replace"))
        raw = value.encode("utf-8")
        _check_env_value(raw)
        body += _item(ENV, name.encode("ascii") + b"=" + raw)
    return _finish(body, secret)


def encode_response(timestamp: bytes | None, secret: bytes | None = None) -> bytes:
    """The answer to a request: RESPONSE with the request's timestamp copied."""
    body = bytes((VERSION,)) + _item(RESPONSE, b"")
    if timestamp is not None:
        body += _item(TIMESTAMP, timestamp)
    return _finish(body, secret)


def _check_env_name(name: bytes) -> None:
    if not name or not all(c == 0x5F or 0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A for c in name):
        raise PacketError("ENV name must be [A-Z0-9_]+")


def _check_env_value(value: bytes) -> None:
    if any(c < 0x20 or c == 0x7F for c in value):
        raise PacketError("control character in ENV value")


def _check_timestamp(text: bytes) -> None:
    if not 1 <= len(text) <= MAX_TIMESTAMP_TEXT:
        raise PacketError("bad TIMESTAMP length")
    whole, dot, frac = text.partition(b".")
    if not whole.isdigit() or (dot and not frac.isdigit()):
        raise PacketError("TIMESTAMP is not decimal seconds")


def is_legacy(data: bytes) -> bool:
    """True for the C programs' packet: a bare ASCII address (no version byte)."""
    return bool(data) and data[0] != VERSION


def decode_legacy(data: bytes) -> str:
    """The address in a legacy packet (relay-ctrl's validate_ip, then ours)."""
    if len(data) > MAX_LEGACY + len(b"::ffff:"):
        raise PacketError("legacy packet too long")
    text = data.rstrip(b"\0\n")
    try:
        return parse_ip(text)
    except InvalidAddress:
        raise PacketError("legacy packet is not an IP address") from None


def decode(data: bytes) -> Packet:
    """Parse a packet; PacketError says what is wrong. Does not check the signature."""
    if len(data) > MAX_PACKET:
        raise PacketError(f"packet too long ({len(data)} bytes)")
    if len(data) < 2:
        raise PacketError("packet too short")
    if data[0] != VERSION:
        raise PacketError(f"unknown version {data[0]}")
    pos = 1
    flags: list[int] = []
    timestamp: bytes | None = None
    address: str | None = None
    env: list[tuple[str, str]] = []
    sha: bytes | None = None
    signed_part = b""
    while True:
        if pos >= len(data):
            raise PacketError("no END byte")
        kind = data[pos]
        if kind == END:
            if pos + 1 != len(data):
                raise PacketError("data after END")
            break
        if sha is not None:
            raise PacketError("SHA must be the last item")
        if pos + 2 > len(data):
            raise PacketError("truncated item header")
        length = data[pos + 1]
        start, stop = pos + 2, pos + 2 + length
        if stop > len(data):
            raise PacketError("truncated item")
        if kind not in ITEM_LENGTH:
            raise PacketError(f"unknown item type {kind}")
        fixed = ITEM_LENGTH[kind]
        if fixed is not None and length != fixed:
            raise PacketError(f"item {kind} must be {fixed} bytes")
        value = data[start:stop]
        if kind in (REQUEST, RESPONSE):
            flags.append(kind)
        elif kind == TIMESTAMP:
            if timestamp is not None:
                raise PacketError("two TIMESTAMP items")
            _check_timestamp(value)
            timestamp = value
        elif kind in (IPV4, IPV6):
            if address is not None:
                raise PacketError("two address items")
            address = (".".join(str(b) for b in value) if kind == IPV4
                       else parse_ip(format_ipv6(value)))
        elif kind == ENV:
            name, sep, val = value.partition(b"=")
            if not sep:
                raise PacketError("ENV item without '='")
            _check_env_name(name)
            _check_env_value(val)
            try:
                env.append((name.decode("ascii"), val.decode("utf-8")))
            except UnicodeDecodeError:
                raise PacketError("ENV value is not UTF-8") from None
        else:  # SHA
            signed_part = data[:pos]
            sha = value
        pos = stop
    if len(flags) != 1:
        raise PacketError("exactly one of REQUEST or RESPONSE is required")
    response = flags[0] == RESPONSE
    if not response and (address is None or timestamp is None):
        raise PacketError("a request needs an address and a TIMESTAMP")
    return Packet(response, timestamp, address, tuple(env), sha, signed_part)


def verify(packet: Packet, secret: bytes) -> bool:
    """True when the packet carries a SHA item made with ``secret``."""
    if packet.sha is None:
        return False
    return hmac.compare_digest(packet.sha, sign(packet.signed_part, secret))


class ReplayGuard:
    """Refuses stale, future and already-seen signed packets (see the module docstring)."""

    def __init__(self, window: float = REPLAY_WINDOW, capacity: int = MAX_REMEMBERED) -> None:
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def check(self, packet: Packet, now: float) -> str | None:
        """None when the packet is fresh (and is now remembered), else why not."""
        self._forget(now)
        if packet.sha is None or packet.timestamp is None:
            return "unsigned or without a timestamp"
        stamp = packet.timestamp_value()
        if stamp < now - self.window:
            return f"timestamp {now - stamp:.0f}s old (limit {self.window:.0f}s)"
        if stamp > now + self.window:
            return f"timestamp {stamp - now:.0f}s in the future (limit {self.window:.0f}s)"
        if packet.sha in self._seen:
            return "replayed (seen before)"
        if len(self._seen) >= self.capacity:
            return "too many packets in the replay window"
        self._seen[packet.sha] = stamp if stamp > now else now
        return None

    def _forget(self, now: float) -> None:
        # Entries are appended in arrival order with a time >= every earlier one's
        # arrival, so the oldest sit at the front.
        cutoff = now - self.window
        seen = self._seen
        while seen:
            if next(iter(seen.values())) >= cutoff:
                break
            seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)
