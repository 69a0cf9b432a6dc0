"""RFC 5321 path parsing, canonical domains and relay-trick detection (pure, no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.protocols.smtp_address import (
    TRICK_AT,
    TRICK_BANG,
    TRICK_PERCENT,
    TRICK_QUOTED,
    TRICK_ROUTE,
    AddressError,
    canonical_address,
    canonical_domain,
    parse_mailbox,
    quote_local_part,
    split_path,
)


@pytest.mark.parametrize(("arg", "expected"), [
    ("<a@b.example>", ("a@b.example", "")),
    ("<a@b.example> SIZE=100 BODY=8BITMIME", ("a@b.example", "SIZE=100 BODY=8BITMIME")),
    ("<>", ("", "")),
    ("  <a@b.example>", ("a@b.example", "")),
    ('<"a>b"@c.example>', ('"a>b"@c.example', "")),
    ('<"a\\"> x"@c.example>', ('"a\\"> x"@c.example', "")),
    ("a@b.example", ("a@b.example", "")),
    ("a@b.example SIZE=1", ("a@b.example", "SIZE=1")),
])
def test_split_path(arg: str, expected: tuple[str, str]) -> None:
    assert split_path(arg) == expected


@pytest.mark.parametrize("arg", ["<a@b.example", "<a@b.example>x", '<"a@b.example>'])
def test_split_path_unterminated(arg: str) -> None:
    assert split_path(arg) is None


def test_plain_mailbox() -> None:
    m = parse_mailbox("Alice@Example.ORG")
    assert (m.local_part, m.domain, m.tricks, m.quoted, m.literal) == (
        "Alice", "example.org", frozenset(), False, False)
    assert m.address == "Alice@example.org"


def test_null_path() -> None:
    m = parse_mailbox("")
    assert m.null and m.address == ""


@pytest.mark.parametrize(("path", "trick"), [
    ("user%remote.example@local.example", TRICK_PERCENT),
    ("user%remote.example", TRICK_PERCENT),
    ("remote.example!user@local.example", TRICK_BANG),
    ("remote.example!user", TRICK_BANG),
    ("@local.example:user@remote.example", TRICK_ROUTE),
    ("@a.example,@b.example:user@remote.example", TRICK_ROUTE),
    ('"user@remote.example"@local.example', TRICK_QUOTED),
    ('"user%remote.example"@local.example', TRICK_QUOTED),
    ('"remote!user"@local.example', TRICK_QUOTED),
    ('"user@remote.example"', TRICK_QUOTED),
    ("user@remote.example@local.example", TRICK_AT),
])
def test_tricks_are_reported(path: str, trick: str) -> None:
    assert trick in parse_mailbox(path).tricks


def test_source_route_is_dropped_from_the_mailbox() -> None:
    m = parse_mailbox("@local.example,@b.example:user@Remote.Example")
    assert m.route == ("local.example", "b.example")
    assert (m.local_part, m.domain) == ("user", "remote.example")
    assert m.address == "user@remote.example"


def test_harmless_quoted_local_part() -> None:
    m = parse_mailbox('"john doe"@example.org')
    assert m.tricks == frozenset() and m.quoted
    assert m.local_part == "john doe"
    assert m.address == '"john doe"@example.org'


@pytest.mark.parametrize("char", ["\0", "\r", "\n", "\t", "\x1b", "\x7f"])
def test_control_characters_refused(char: str) -> None:
    for path in (f"us{char}er@example.org", f"user@exa{char}mple.org",
                 f'"us{char}er"@example.org'):
        with pytest.raises(AddressError) as e:
            parse_mailbox(path)
        assert e.value.reason == "control"


def test_control_characters_in_bytes_refused() -> None:
    with pytest.raises(AddressError) as e:
        parse_mailbox(b"user\x00@example.org")
    assert e.value.reason == "control"


@pytest.mark.parametrize("path", [
    "user..x@example.org", ".user@example.org", "user.@example.org", "us(er)@example.org",
    "user@", "@example.org", '"unterminated@example.org', '"a"b@example.org',
    "us er@example.org", "@a.example:",
])
def test_syntax_errors(path: str) -> None:
    with pytest.raises(AddressError) as e:
        parse_mailbox(path)
    assert e.value.reason in ("syntax", "domain")


@pytest.mark.parametrize("path", [
    "user@example..org", "user@.example.org", "user@example.org..", "user@-x.example",
    "user@under_score.example", "user@xn--zz.example", "user@[1.2.3]", "user@[::1]",
    "user@[IPv7:::1]", "user@[1.2.3.4", "user@" + "a" * 64 + ".example",
])
def test_bad_domains(path: str) -> None:
    with pytest.raises(AddressError) as e:
        parse_mailbox(path)
    assert e.value.reason == "domain"


def test_length_limits() -> None:
    with pytest.raises(AddressError) as e:
        parse_mailbox("a" * 65 + "@example.org")
    assert e.value.reason == "too-long"
    with pytest.raises(AddressError) as e:
        parse_mailbox("a@" + ".".join(["abcdefgh"] * 30) + ".example")
    assert e.value.reason in ("too-long", "domain")
    assert parse_mailbox("a" * 64 + "@example.org").local_part == "a" * 64


def test_non_ascii_needs_smtputf8() -> None:
    with pytest.raises(AddressError):
        parse_mailbox("josé@example.org")
    assert parse_mailbox("josé@example.org", allow_utf8=True).local_part == "josé"


@pytest.mark.parametrize(("text", "canonical"), [
    ("EXAMPLE.org", "example.org"),
    ("example.org.", "example.org"),
    ("Example.Org.", "example.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.EXAMPLE.", "xn--bcher-kva.example"),
    ("[127.0.0.1]", "[127.0.0.1]"),
    ("[IPv6:2001:DB8:0:0:0:0:0:1]", "[IPv6:2001:db8::1]"),
    ("[ipv6:::ffff:192.0.2.1]", "[192.0.2.1]"),
])
def test_canonical_domain(text: str, canonical: str) -> None:
    assert canonical_domain(text) == canonical


@pytest.mark.parametrize("text", [
    "example.org..",          # two trailing dots
    "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.org",  # full-width letters: not "example"
    "xn--bcher-kva-.example",  # not valid Punycode
    "exa mple.org",
    "",
])
def test_not_a_spelling_of_a_domain(text: str) -> None:
    with pytest.raises(AddressError):
        canonical_domain(text)


def test_different_idn_is_a_different_domain() -> None:
    # Cyrillic small a (U+0430) looks like Latin "a": a different domain, not a variant.
    assert canonical_domain("ex\u0430mple.org") != canonical_domain("example.org")
    # IDNA2008 keeps "ß": faß.de and fass.de are two domains.
    assert canonical_domain("faß.example") != canonical_domain("fass.example")


def test_quote_local_part() -> None:
    assert quote_local_part("a.b+c") == "a.b+c"
    assert quote_local_part("john doe") == '"john doe"'
    assert quote_local_part('a"b\\c') == '"a\\"b\\\\c"'
    assert quote_local_part("") == '""'


_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_domains = st.lists(_labels, min_size=1, max_size=4).map(".".join)


@settings(max_examples=60, deadline=None)
@given(_domains, st.lists(st.booleans(), min_size=40, max_size=40), st.booleans())
def test_case_and_trailing_dot_variants_are_the_same_domain(
        domain: str, upper: list[bool], dot: bool) -> None:
    variant = "".join(c.upper() if u else c for c, u in zip(domain, upper, strict=False))
    variant += domain[len(upper):]
    if dot:
        variant += "."
    assert canonical_domain(variant) == canonical_domain(domain) == domain


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=40))
def test_parser_never_crashes_and_never_accepts_control_chars(text: str) -> None:
    try:
        m = parse_mailbox(text, allow_utf8=True)
    except AddressError:
        return
    assert not any(ord(c) < 32 or ord(c) == 127 for c in m.local_part)
    if m.domain is not None:
        assert canonical_domain(m.domain) == m.domain  # canonical form is a fixed point


def test_canonical_address_rewrites_only_the_domain() -> None:
    assert canonical_address("Bob@EXAMPLE.org.") == "Bob@example.org"
    assert canonical_address("bob@b\u00fccher.example") == "bob@xn--bcher-kva.example"
    assert canonical_address("no-at-sign") == "no-at-sign"
    assert canonical_address("bob@bad..domain") == "bob@bad..domain"
