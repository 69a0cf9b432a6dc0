"""The socketmap protocol core: bytes in, requests out, answers out as bytes."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaygate.decision import Decision, Verdict
from relaygate.protocols.socketmap import (
    MAX_REQUEST_SIZE,
    NOTFOUND,
    SocketmapProtocolError,
    SocketmapReader,
    SocketmapRequest,
    answer_for,
    client_address,
    found,
    netstring,
)

names = st.lists(st.integers(0x21, 0x7E), min_size=1, max_size=40).map(bytes)
keys = st.binary(max_size=200)
requests = st.tuples(names, keys)


def read_all(reader: SocketmapReader) -> list[SocketmapRequest]:
    out = []
    while (req := reader.next_request()) is not None:
        out.append(req)
    return out


@given(st.lists(requests, max_size=8), st.data())
def test_any_split_of_a_request_stream_gives_the_same_requests(
        reqs: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    stream = b"".join(netstring(n + b" " + k) for n, k in reqs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = SocketmapReader()
    got: list[SocketmapRequest] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        if cut == prev:
            continue  # b"" is the end of the stream
        reader.receive_data(stream[prev:cut])
        got += read_all(reader)
        prev = cut
    reader.receive_data(b"")
    got += read_all(reader)
    assert got == [SocketmapRequest(n, k) for n, k in reqs]
    assert reader.buffered == 0


@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_requests_or_a_protocol_error_never_anything_else(
        junk: bytes) -> None:
    reader = SocketmapReader()
    try:
        reader.receive_data(junk)
        read_all(reader)
        reader.receive_data(b"")
        read_all(reader)
    except SocketmapProtocolError:
        pass


@pytest.mark.parametrize("stream", [
    b"x:a b,",              # length is not a number
    b":a b,",               # empty length
    b"-3:a b,",
    b"3:a b;",              # no comma
    b"2:a b,",              # length too short: 'b' where the comma belongs
    b"4:a b,x",             # length too long: the comma is inside, 'x' after it
    b"3:abc,",              # no space between name and key
    b"4: abc,",             # empty name
    b"5:a\x01b c,",         # control character in the name
    b"1234567:",            # more digits than any allowed length
    b"4097:",               # over the limit
])
def test_malformed_netstrings(stream: bytes) -> None:
    reader = SocketmapReader()
    reader.receive_data(stream)
    with pytest.raises(SocketmapProtocolError):
        read_all(reader)


def test_empty_key_is_a_request() -> None:
    reader = SocketmapReader()
    reader.receive_data(b"3:ab ,")
    assert reader.next_request() == SocketmapRequest(b"ab", b"")


def test_limit_is_exact() -> None:
    payload = b"m " + b"k" * (MAX_REQUEST_SIZE - 2)
    reader = SocketmapReader()
    reader.receive_data(netstring(payload))
    assert reader.next_request() == SocketmapRequest(b"m", payload[2:])
    reader.receive_data(netstring(payload + b"k"))
    with pytest.raises(SocketmapProtocolError, match="limit"):
        reader.next_request()


def test_over_long_length_is_refused_before_the_body_arrives() -> None:
    reader = SocketmapReader()
    reader.receive_data(b"99999")
    with pytest.raises(SocketmapProtocolError):
        reader.next_request()


def test_partial_request_at_end_of_stream_is_an_error() -> None:
    reader = SocketmapReader()
    reader.receive_data(b"10:relaygate")
    assert reader.next_request() is None
    reader.receive_data(b"")
    with pytest.raises(SocketmapProtocolError, match="end of stream"):
        reader.next_request()


@pytest.mark.parametrize(("key", "want"), [
    (b"192.0.2.1", "192.0.2.1"),
    (b"[192.0.2.1]", "192.0.2.1"),
    (b"IPv6:2001:db8::1", "2001:db8::1"),
    (b"ipv6:2001:DB8:0::1", "2001:db8::1"),
    (b"2001:db8::1", "2001:db8::1"),
    (b"fe80::1", "fe80::1"),            # looks like a tag 'fe80:' but is an address
    (b"abcd:ef::1", "abcd:ef::1"),
    (b"::ffff:192.0.2.1", "192.0.2.1"),
    (b"IPv6:::ffff:192.0.2.1", "192.0.2.1"),
    (b"POP:192.0.2.1", "192.0.2.1"),
    (b"POP:IPv6:2001:db8::1", "2001:db8::1"),
    (b"pop:fe80::1", "fe80::1"),
    (b"", None),
    (b"POP:", None),
    (b"POP:POP:192.0.2.1", None),       # one tag only
    (b"alice@example.org", None),
    (b"192.0.2.256", None),
    (b"IPv6:192.0.2.1x", None),
    (b"fe80::1%eth0", None),
    (b"\xff192.0.2.1", None),
    (b"192.0.2.1 ", None),
])
def test_client_address_forms(key: bytes, want: str | None) -> None:
    assert client_address(key) == want


@given(st.ip_addresses())
def test_every_address_in_sendmail_and_postfix_form(addr: ipaddress._BaseAddress) -> None:
    want = str(addr)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        want = str(addr.ipv4_mapped)
    forms = [str(addr).encode(), b"POP:" + str(addr).encode()]
    if addr.version == 6:
        forms += [b"IPv6:" + str(addr).encode(), b"POP:IPv6:" + addr.exploded.encode()]
    for form in forms:
        assert client_address(form) == want, form


@given(st.binary(max_size=80))
def test_client_address_never_raises(key: bytes) -> None:
    got = client_address(key)
    assert got is None or ipaddress.ip_address(got)


def test_answers() -> None:
    allow = Decision(Verdict.ALLOW, "window", "grant")
    deny = Decision(Verdict.DENY, "no window", "none")
    down = Decision(Verdict.TEMPFAIL, "grant store unreachable: secret detail", "store")
    assert answer_for(allow, found("OK")) == b"5:OK OK,"
    assert answer_for(allow, found("RELAY")) == b"8:OK RELAY,"
    assert answer_for(deny, found("OK")) == NOTFOUND == b"9:NOTFOUND ,"
    temp = answer_for(down, found("OK"))
    assert temp.startswith(b"") and b"TEMP " in temp and b"secret" not in temp
    assert temp == netstring(b"TEMP relaygate: grant store unreachable")


@given(st.text(max_size=50))
def test_answers_are_well_formed_netstrings(value: str) -> None:
    out = answer_for(Decision(Verdict.ALLOW, "w", "grant"), found(value or "OK"))
    reader = SocketmapReader(max_request_size=2000)
    reader.receive_data(out)
    req = reader.next_request()
    assert req is not None and req.name == b"OK"
    assert all(0x20 <= c <= 0x7E for c in req.key)
