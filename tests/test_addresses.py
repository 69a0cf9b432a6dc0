"""Address folding and the canonical form, checked against the ipaddress module.

parse_ip must give, for every textual form of an address that inet_pton(3)
accepts, the same canonical text as ``ipaddress`` (IPv4-mapped IPv6 folded to
IPv4, other IPv6 RFC 5952 compressed), and refuse everything else.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.addresses import (
    DEFAULT_IPV6_PREFIX,
    check_ipv6_prefix,
    client_group,
    format_ipv6,
    is_loopback,
    packed,
    parse_ip,
    require_canonical,
)
from relaygate.errors import InvalidAddress


def oracle(text: str) -> str:
    """The canonical form as the standard library computes it."""
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return addr.compressed


@st.composite
def ipv6_text(draw: st.DrawFn, raw: bytes | None = None) -> tuple[str, bytes]:
    """Any valid textual form of an IPv6 address (case, leading zeros, '::', dotted tail)."""
    if raw is None:
        raw = draw(st.ip_addresses(v=6)).packed
    groups = [(raw[i] << 8) | raw[i + 1] for i in range(0, 16, 2)]
    dotted = draw(st.booleans())
    n = 6 if dotted else 8
    parts: list[str | None] = []
    for value in groups[:n]:
        digits = f"{value:x}"
        width = draw(st.integers(len(digits), 4))
        text = digits.rjust(width, "0")
        parts.append(text.upper() if draw(st.booleans()) else text)
    # optionally replace one run of zero groups (any length >= 1) with "::"
    zero_runs = [
        (i, j) for i in range(n) for j in range(i + 1, n + 1)
        if all(groups[k] == 0 for k in range(i, j))
    ]
    tail = ".".join(str(b) for b in raw[12:]) if dotted else None
    compress = draw(st.booleans())
    if zero_runs and compress:
        i, j = draw(st.sampled_from(zero_runs))
        head = ":".join(p for p in parts[:i] if p is not None)
        rest = [p for p in parts[j:] if p is not None]
        if tail is not None:
            rest.append(tail)
        text = head + "::" + ":".join(rest)
    else:
        all_parts = [p for p in parts if p is not None]
        if tail is not None:
            all_parts.append(tail)
        text = ":".join(all_parts)
    return text, raw


@given(st.ip_addresses(v=4))
def test_ipv4_is_already_canonical(addr: ipaddress.IPv4Address) -> None:
    text = str(addr)
    assert parse_ip(text) == text == oracle(text)
    assert parse_ip(text.encode()) == text
    assert packed(text) == addr.packed


@settings(max_examples=300)
@given(ipv6_text())
def test_ipv6_variants_fold_to_one_form(case: tuple[str, bytes]) -> None:
    text, raw = case
    want = oracle(text)
    assert parse_ip(text) == want
    assert parse_ip(text.encode("ascii")) == want
    assert parse_ip(f"[{text}]") == want
    assert parse_ip(want) == want  # idempotent
    assert require_canonical(want) == want
    assert ipaddress.ip_address(want).packed in (raw, raw[12:])


@settings(max_examples=200)
@given(st.ip_addresses(v=4).flatmap(
    lambda a: ipv6_text(b"\0" * 10 + b"\xff\xff" + a.packed).map(lambda c: (c[0], str(a)))))
def test_ipv4_mapped_folds_to_ipv4_in_any_spelling(case: tuple[str, str]) -> None:
    text, v4 = case
    assert parse_ip(text) == v4 == oracle(text)


@pytest.mark.parametrize(
    "text", ["::ffff:1.2.3.4", "::FFFF:1.2.3.4", "0:0:0:0:0:ffff:1.2.3.4", "0000::FfFf:1.2.3.4",
             "::ffff:102:304", "0:0:0:0:0:FFFF:0102:0304", "[::ffff:1.2.3.4]"],
)
def test_mapped_examples(text: str) -> None:
    assert parse_ip(text) == "1.2.3.4"


@settings(max_examples=300)
@given(st.text(alphabet="0123456789abcdefABCDEF:.", min_size=1, max_size=45))
def test_random_text_agrees_with_ipaddress(text: str) -> None:
    try:
        want: str | None = oracle(text)
    except ValueError:
        want = None
    try:
        got: str | None = parse_ip(text)
    except InvalidAddress:
        got = None
    assert got == want


@given(st.one_of(st.ip_addresses(v=4).map(str), ipv6_text().map(lambda c: c[0])))
def test_canonical_text_is_a_safe_file_name(text: str) -> None:
    name = parse_ip(text)
    assert "/" not in name and "%" not in name and not name.startswith(".")
    assert name.strip() == name and 2 <= len(name) <= 39
    assert name == name.lower()


@pytest.mark.parametrize(
    "junk",
    ["fe80::1%eth0", "fe80::1%1", "..", "../x", ".", "/", "1.2.3.4/32", "2001:db8::/32", "",
     " ", " 1.2.3.4", "1.2.3.4 ", "1.2.3.4\n", "\t::1", "1.2.3.4.5", "01.2.3.4", "1.2.3.04",
     "010.0.0.1", "00.0.0.0", "0x1.2.3.4", "1.2.3", "1", "1.2.3.256", "-1.2.3.4", ":::",
     "1::2::3", "[1.2.3.4", "::1]", "::ffff:01.2.3.4", "\uff11.2.3.4", "1.2.3.4\x00",
     "::1\x00", "12345::", "g::1", "localhost", "1.2.3.4:25", "[::1]:25", "a" * 100,
     "1:2:3:4:5:6:7:8:9", "::ffff:1.2.3.4.5", "1.2.3.4\u200b"],
)
def test_junk_is_refused(junk: str) -> None:
    with pytest.raises(InvalidAddress):
        parse_ip(junk)


def test_bytes_must_be_ascii() -> None:
    with pytest.raises(InvalidAddress):
        parse_ip(b"\xff1.2.3.4")
    with pytest.raises(InvalidAddress):
        parse_ip(1234)  # type: ignore[arg-type]


def test_leading_zero_ipv4_is_refused_not_read_as_octal() -> None:
    # inet_aton would read 010 as 8; inet_pton (and we) refuse the ambiguity outright
    for text in ("010.1.1.1", "1.1.1.010", "::ffff:010.1.1.1"):
        with pytest.raises(InvalidAddress):
            parse_ip(text)


def test_require_canonical_refuses_other_spellings() -> None:
    for text in ("::FFFF:1.2.3.4", "2001:DB8::1", "2001:db8:0:0::1", "[::1]"):
        with pytest.raises(InvalidAddress):
            require_canonical(text)


def test_format_and_loopback() -> None:
    assert format_ipv6(b"\0" * 16) == "::"
    assert format_ipv6(b"\0" * 15 + b"\1") == "::1"
    assert format_ipv6(bytes.fromhex("20010db8000000010000000000000001")) == "2001:db8:0:1::1"
    # one zero group is not compressed (RFC 5952 section 4.2.2)
    assert format_ipv6(bytes.fromhex("20010db8000100020003000400050000")) == "2001:db8:1:2:3:4:5:0"
    # the first of two equal runs is compressed (section 4.2.3)
    assert format_ipv6(bytes.fromhex("20010000000000010000000000010001")) == "2001::1:0:0:1:1"
    # the longest run wins over an earlier shorter one (section 4.2.3)
    assert format_ipv6(bytes.fromhex("20010000000000010000000000000001")) == "2001:0:0:1::1"
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("::2")


# -- grouping for per-address limits ---------------------------------------------


def test_ipv4_is_its_own_group() -> None:
    for ip in ("192.0.2.7", "127.0.0.1", "10.1.2.3"):
        assert client_group(ip) == ip
        assert client_group(ip, 48) == ip


def test_ipv4_mapped_ipv6_is_folded_to_ipv4() -> None:
    assert client_group("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_group("::FFFF:c000:0207", 128) == "192.0.2.7"


def test_ipv6_is_grouped_by_its_prefix() -> None:
    assert DEFAULT_IPV6_PREFIX == 64
    a, b = "2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::1"
    assert client_group(a) == client_group(b) == "2001:db8:1:2::/64"
    assert client_group("2001:db8:1:3::1") == "2001:db8:1:3::/64"  # the next /64
    assert client_group("2001:DB8:0001:0002::0001") == "2001:db8:1:2::/64"  # any spelling
    assert client_group(a, 48) == "2001:db8:1::/48"
    assert client_group("2001:db8:1:2f::1", 60) == "2001:db8:1:20::/60"  # inside a group
    assert client_group("2001:db8:8000::1", 33) == "2001:db8:8000::/33"
    assert client_group("2001:db8:7fff::1", 33) == "2001:db8::/33"
    assert client_group(a, 128) == "2001:db8:1:2:aaaa:bbbb:cccc:dddd"
    assert client_group("::1") == "::/64"


@given(st.binary(min_size=16, max_size=16), st.integers(min_value=32, max_value=127))
@settings(max_examples=300)
def test_ipv6_grouping_matches_ipaddress(raw: bytes, prefix: int) -> None:
    addr = ipaddress.IPv6Address(raw)
    if addr.ipv4_mapped is not None:
        return
    net = ipaddress.IPv6Network((int(addr), prefix), strict=False)
    assert client_group(str(addr), prefix) == f"{net.network_address.compressed}/{prefix}"


def test_non_addresses_are_keys_as_they_are() -> None:
    assert client_group("unix") == "unix"
    assert client_group("not:an:address") == "not:an:address"


@pytest.mark.parametrize("bad", [0, 8, 31, 129, -64, 64.0, "64", True, None])
def test_bad_prefixes_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="from 32 to 128"):
        check_ipv6_prefix(bad)
    with pytest.raises(ValueError):
        client_group("2001:db8::1", bad)  # type: ignore[arg-type]


def test_good_prefixes() -> None:
    for n in (32, 48, 56, 64, 128):
        assert check_ipv6_prefix(n) == n
