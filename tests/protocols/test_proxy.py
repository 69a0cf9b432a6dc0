"""The PROXY protocol parser: bytes only, no sockets."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.protocols.proxy import (
    MAX_HEADER_LENGTH,
    V1_MAX_LENGTH,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    Incomplete,
    ProxyHeader,
    ProxyHeaderError,
    build_v1,
    build_v2,
    parse_header,
)


def test_v1_tcp4() -> None:
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\nEHLO x\r\n"
    h = parse_header(data)
    assert h == ProxyHeader(1, data.index(b"EHLO"), False, ("192.0.2.7", 56324),
                            ("198.51.100.1", 25))


def test_v1_tcp6_is_canonical() -> None:
    h = parse_header(b"PROXY TCP6 2001:DB8:0:0::7 ::1 1 65535\r\n")
    assert isinstance(h, ProxyHeader)
    assert h.source == ("2001:db8::7", 1)
    assert h.destination == ("::1", 65535)


def test_v1_tcp6_mapped_ipv4_is_folded() -> None:
    h = parse_header(b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n")
    assert isinstance(h, ProxyHeader) and h.source == ("192.0.2.7", 1)


def test_v1_unknown_is_local() -> None:
    data = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\nrest"
    h = parse_header(data)
    assert h == ProxyHeader(1, len(data) - 4, True)
    assert parse_header(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, 15, True)


def test_v1_longest_line_is_accepted() -> None:
    six = ":".join(["ffff"] * 8)
    line = f"PROXY TCP6 {six} {six} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX_LENGTH - 3  # TCP6 is 3 bytes shorter than UNKNOWN
    assert isinstance(parse_header(line), ProxyHeader)
    unknown = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(unknown) == V1_MAX_LENGTH
    assert isinstance(parse_header(unknown), ProxyHeader)


@pytest.mark.parametrize("data, why", [
    (b"EHLO x\r\n", "signature"),
    (b"PROXi", "signature"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\n", "CRLF"),
    (b"PROXY TCP4 192.0.2.7\r198.51.100.1 56324 25\r\n", "CRLF"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25 \r\n", "two addresses"),
    (b"PROXY  TCP4 192.0.2.7 198.51.100.1 56324 25\r\n", "family"),
    (b"PROXY TCP5 192.0.2.7 198.51.100.1 56324 25\r\n", "family"),
    (b"PROXY TCP4 2001:db8::1 198.51.100.1 56324 25\r\n", "family"),
    (b"PROXY TCP6 192.0.2.7 ::1 56324 25\r\n", "family"),
    (b"PROXY TCP4 192.0.2.07 198.51.100.1 56324 25\r\n", "address"),
    (b"PROXY TCP4 192.0.2.256 198.51.100.1 56324 25\r\n", "address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 56324 25\r\n", "address"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 +5 25\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 05 25\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1_0 25\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n", "range"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 5 \xd9\xa3\r\n", "port"),
    (b"PROXY UNKNOWN " + b"x" * 100, "107"),
])
def test_v1_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        parse_header(data)


def test_v1_incomplete_asks_for_more() -> None:
    assert parse_header(b"") == Incomplete(1)
    assert parse_header(b"PRO") == Incomplete(4)
    assert parse_header(b"PROXY TCP4 1.2.3.4 ") == Incomplete(20)
    assert parse_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") == Incomplete(32)


def _v2(cmd: int, fam: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([cmd, fam]) + struct.pack("!H", n) + payload


def test_v2_ipv4() -> None:
    block = bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 56324, 25)
    data = _v2(0x21, 0x11, block) + b"\x16\x03\x01"  # a TLS ClientHello follows
    h = parse_header(data)
    assert h == ProxyHeader(2, 28, False, ("192.0.2.7", 56324), ("198.51.100.1", 25))


def test_v2_ipv6_with_tlvs() -> None:
    src = ipaddress.IPv6Address("2001:db8::7").packed
    dst = ipaddress.IPv6Address("::ffff:198.51.100.1").packed
    tlvs = b"\x01\x00\x02h2" + b"\x05\x00\x04abcd"  # ALPN, unique id
    data = _v2(0x21, 0x21, src + dst + struct.pack("!HH", 1, 2) + tlvs)
    h = parse_header(data)
    assert h == ProxyHeader(2, len(data), False, ("2001:db8::7", 1), ("198.51.100.1", 2))


@pytest.mark.parametrize("cmd, fam", [(0x20, 0x00), (0x20, 0x11), (0x21, 0x00), (0x21, 0x31),
                                      (0x21, 0x10)])
def test_v2_local_unspec_unix_are_the_proxys_own(cmd: int, fam: int) -> None:
    payload = {0x11: 12, 0x31: 216, 0x10: 12}.get(fam, 0) * b"\x01"
    h = parse_header(_v2(cmd, fam, payload))
    assert isinstance(h, ProxyHeader) and h.local and h.source is None


@pytest.mark.parametrize("data, why", [
    (_v2(0x11, 0x11, b"\0" * 12), "version"),
    (V2_SIGNATURE + b"\x31", "version"),
    (_v2(0x22, 0x11, b"\0" * 12), "command"),
    (_v2(0x21, 0x12, b"\0" * 12), "datagram"),
    (_v2(0x21, 0x41, b"\0" * 12), "family"),
    (_v2(0x21, 0x11, b"\0" * 4), "shorter"),
    (_v2(0x21, 0x21, b"\0" * 12), "shorter"),
    (_v2(0x21, 0x11, b"", length=V2_MAX_PAYLOAD + 1), "longer"),
    (b"\r\n\r\n\x00\r\nQUIX\n", "signature"),
])
def test_v2_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        parse_header(data)


def test_v2_incomplete() -> None:
    assert parse_header(V2_SIGNATURE[:5]) == Incomplete(16)
    header = _v2(0x21, 0x11, b"\0" * 12)
    assert parse_header(header[:20]) == Incomplete(28)


# -- properties ------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
endpoints = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)


def _canonical(ip: str) -> str:
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return str(a.ipv4_mapped)
    return str(a)


@settings(max_examples=300)
@given(endpoints, st.sampled_from([1, 2]), st.binary(max_size=20))
def test_round_trip_and_every_split(ends: tuple[tuple[str, int], tuple[str, int]],
                                    version: int, tail: bytes) -> None:
    src, dst = ends
    header = build_v1(src, dst) if version == 1 else build_v2(src, dst)
    h = parse_header(header + tail)
    assert isinstance(h, ProxyHeader)
    assert (h.version, h.length, h.local) == (version, len(header), False)
    assert h.source == (_canonical(src[0]), src[1])
    assert h.destination == (_canonical(dst[0]), dst[1])
    for cut in range(len(header)):
        part = parse_header(header[:cut])
        # an incomplete header asks for more, never past its own end
        assert isinstance(part, Incomplete)
        assert cut < part.at_least <= len(header)


@settings(max_examples=300)
@given(endpoints)
def test_agrees_with_the_proxy_protocol_package(
        ends: tuple[tuple[str, int], tuple[str, int]]) -> None:
    """An independent implementation (pymap's dependency) reads the same addresses."""
    from proxyprotocol.v1 import ProxyProtocolV1
    from proxyprotocol.v2 import ProxyProtocolV2

    src, dst = ends
    for header, theirs in ((build_v1(src, dst), ProxyProtocolV1()),
                           (build_v2(src, dst), ProxyProtocolV2())):
        ours = parse_header(header)
        assert isinstance(ours, ProxyHeader) and ours.source is not None
        result = theirs.unpack(header)
        peer = result.peername  # type: ignore[attr-defined]
        assert ours.source == (_canonical(str(peer[0])), peer[1])


@settings(max_examples=1000)
@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.binary(max_size=120).map(lambda b: V2_SIGNATURE + b),
))
def test_garbage_never_raises_anything_else(data: bytes) -> None:
    try:
        result = parse_header(data)
    except ProxyHeaderError:
        return
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= min(len(data), MAX_HEADER_LENGTH)
    else:
        assert result.at_least > len(data) or result.at_least <= MAX_HEADER_LENGTH
