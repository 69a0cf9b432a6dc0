"""relay-ctrl's UDP packet (packet.html): bytes in, bytes out, no sockets."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.protocols import relayctrl_packet as rp

SECRET = b"s3cret"


def test_golden_request_bytes() -> None:
    packet = rp.encode_request("192.0.2.7", now=1700000000.123456, env={"USER": "alice"},
                               secret=SECRET)
    body = (b"\x01"                                   # version 1
            b"\x01\x00"                               # REQUEST
            b"\x03\x111700000000.123456"              # TIMESTAMP, 17 bytes
            b"\x04\x04\xc0\x00\x02\x07"               # IPV4 192.0.2.7
            b"\x06\x0aUSER=alice")                    # ENV
    sha = hashlib.sha256(body + SECRET).digest()
    assert packet == body + b"\x07\x20" + sha + b"\x00"


def test_unsigned_request_round_trip_ipv6() -> None:
    packet = rp.encode_request("2001:DB8::1", now=5.5, env={"USER": "bob", "DOMAIN": "ex.org"})
    assert packet[-1] == 0 and b"\x07\x20" not in packet
    decoded = rp.decode(packet)
    assert not decoded.response and not decoded.signed
    assert decoded.address == "2001:db8::1"
    assert decoded.timestamp == b"5.500000"
    assert decoded.env == (("USER", "bob"), ("DOMAIN", "ex.org"))
    assert decoded.env_value("DOMAIN") == "ex.org"


def test_mapped_ipv6_is_sent_as_ipv4() -> None:
    decoded = rp.decode(rp.encode_request("::ffff:10.1.2.3", now=1.0))
    assert decoded.address == "10.1.2.3"


def test_signature_verifies_and_detects_tampering() -> None:
    packet = rp.encode_request("10.0.0.1", now=100.0, secret=SECRET)
    assert rp.verify(rp.decode(packet), SECRET)
    assert not rp.verify(rp.decode(packet), b"other secret")
    # flip the last address byte: still well-formed, no longer signed by us
    tampered = bytearray(packet)
    tampered[packet.index(b"\x04\x04") + 5] ^= 1
    decoded = rp.decode(bytes(tampered))
    assert decoded.address == "10.0.0.0"
    assert not rp.verify(decoded, SECRET)
    assert not rp.verify(rp.decode(rp.encode_request("10.0.0.1", now=1.0)), SECRET)


def test_response_copies_timestamp() -> None:
    request = rp.decode(rp.encode_request("10.0.0.1", now=42.25, secret=SECRET))
    answer = rp.decode(rp.encode_response(request.timestamp, SECRET))
    assert answer.response and answer.timestamp == b"42.250000"
    assert answer.address is None
    assert rp.verify(answer, SECRET)


@pytest.mark.parametrize("data, why", [
    (b"", "too short"),
    (b"\x02\x01\x00\x00", "unknown version"),
    (b"\x01\x01\x00", "no END"),
    (b"\x01\x01\x00\x00\x00", "data after END"),
    (b"\x01\x09\x00\x00", "unknown item type"),
    (b"\x01\x01\x01x\x00", "must be 0 bytes"),
    (b"\x01\x01\x00\x04\x03abc\x00", "must be 4 bytes"),
    (b"\x01\x01\x00\x03\x021x\x04\x04\x01\x02\x03\x04\x00", "TIMESTAMP"),
    (b"\x01\x01\x00\x04\x04\x01\x02\x03\x04\x00", "needs an address and a TIMESTAMP"),
    (b"\x01\x01\x00\x02\x00\x03\x011\x04\x04\x01\x02\x03\x04\x00", "exactly one of"),
    (b"\x01\x01\x00\x03\x011\x04\x04\x01\x02\x03\x04\x04\x04\x01\x02\x03\x04\x00",
     "two address"),
    (b"\x01\x01\x00\x03\x011\x04\x04\x01\x02\x03\x04\x06\x05lower\x00", "ENV"),
    (b"\x01\x01\x00\x03\x011\x04\x04\x01\x02\x03\x04\x06\x07USER=a\n\x00", "control"),
    (b"\x01\x01\x00\x03\x011\x04\x04\x01\x02\x03\x04\x07\x20" + b"x" * 32
     + b"\x06\x06USER=a\x00", "SHA must be the last"),
    (b"\x01\x01\x00\x04\x10", "truncated"),
    (b"\x01" + b"\x06\xff" + b"A" * 255 + b"\x06\xff" + b"A" * 255 + b"\x00", "too long"),
])
def test_malformed_packets_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(rp.PacketError, match=why):
        rp.decode(data)


def test_encoder_refuses_oversized_and_bad_env() -> None:
    with pytest.raises(rp.PacketError):
        rp.encode_request("10.0.0.1", now=1.0, env={f"V{i}": "x" * 200 for i in range(3)})
    with pytest.raises(rp.PacketError):
        rp.encode_request("10.0.0.1", now=1.0, env={"lower": "x"})
    with pytest.raises(rp.PacketError):
        rp.encode_request("10.0.0.1", now=1.0, env={"USER": "a\0b"})


def test_legacy_packets() -> None:
    assert rp.is_legacy(b"10.0.0.1")
    assert not rp.is_legacy(rp.encode_request("10.0.0.1", now=1.0))
    assert rp.decode_legacy(b"10.0.0.1") == "10.0.0.1"
    assert rp.decode_legacy(b"::ffff:10.0.0.1") == "10.0.0.1"
    for bad in (b"../x", b"10.0.0.1; rm", b"10.0.0.256", b"x" * 40):
        with pytest.raises(rp.PacketError):
            rp.decode_legacy(bad)


def test_replay_guard_refuses_stale_future_and_seen() -> None:
    guard = rp.ReplayGuard(window=60)
    now = 1_000_000.0
    fresh = rp.decode(rp.encode_request("10.0.0.1", now=now - 1, secret=SECRET))
    assert guard.check(fresh, now) is None
    assert guard.check(fresh, now + 1) == "replayed (seen before)"
    stale = rp.decode(rp.encode_request("10.0.0.1", now=now - 61, secret=SECRET))
    assert "old" in (guard.check(stale, now) or "")
    future = rp.decode(rp.encode_request("10.0.0.1", now=now + 61, secret=SECRET))
    assert "future" in (guard.check(future, now) or "")
    unsigned = rp.decode(rp.encode_request("10.0.0.1", now=now))
    assert guard.check(unsigned, now) is not None
    # remembered only as long as the packet could be accepted
    assert len(guard) == 1
    assert guard.check(fresh, now + 120) is not None  # stale by now anyway
    assert len(guard) == 0


def test_replay_guard_fails_closed_when_full() -> None:
    guard = rp.ReplayGuard(window=60, capacity=2)
    packets = [rp.decode(rp.encode_request("10.0.0.1", now=100.0 + i / 10, secret=SECRET))
               for i in range(3)]
    assert guard.check(packets[0], 100.5) is None
    assert guard.check(packets[1], 100.5) is None
    assert guard.check(packets[2], 100.5) == "too many packets in the replay window"


names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=12)
values = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\x7f"),
                 max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    address=st.one_of(
        st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
        st.binary(min_size=16, max_size=16).map(lambda b: ":".join(
            b[i:i + 2].hex() for i in range(0, 16, 2))),
    ),
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    env=st.dictionaries(names, values, max_size=3),
    secret=st.one_of(st.none(), st.binary(min_size=1, max_size=64)),
)
def test_round_trip(address: str, now: float, env: dict[str, str], secret: bytes | None) -> None:
    packet = rp.encode_request(address, now=now, env=env, secret=secret)
    assert len(packet) <= rp.MAX_PACKET
    decoded = rp.decode(packet)
    from relaygate.addresses import parse_ip

    assert decoded.address == parse_ip(address)
    assert dict(decoded.env) == env
    assert abs(decoded.timestamp_value() - now) < 1e-5 * max(1.0, now)
    assert decoded.signed == (secret is not None)
    if secret is not None:
        assert rp.verify(decoded, secret)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_decoder_never_crashes(data: bytes) -> None:
    try:
        rp.decode(data)
    except rp.PacketError:
        pass
