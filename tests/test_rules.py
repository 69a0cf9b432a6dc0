"""Static rules: tcprules syntax, CIDR lines, tcpserver's lookup order."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.errors import ConfigError
from relaygate.rules import RuleSet

RULES = """\
# a comment, then blank lines

127.0.0.1:allow,RELAYCLIENT=""
10.0.0.:allow,RELAYCLIENT=""
10.0.0.66:deny
10.1.:allow,RELAYCLIENT="@fixup"
192.168.1.5-9:allow,RELAYCLIENT='',NOTE="range"
172.16.0.0/12:allow,RELAYCLIENT=""
172.16.5.0/24:deny
2001:db8::/32:allow,RELAYCLIENT=""
[2001:db8::1]:deny
::1:allow,RELAYCLIENT="",X="y"
1.2.3.4:allow
1.2.3.4:deny
:allow
"""


@pytest.fixture
def rules() -> RuleSet:
    return RuleSet.parse(RULES, "rules.txt")


def test_exact_beats_prefix(rules: RuleSet) -> None:
    r = rules.match("10.0.0.66")
    assert r is not None and not r.allow and r.line == 5
    r = rules.match("10.0.0.65")
    assert r is not None and r.relays and r.relayclient == "" and r.line == 4


def test_longer_prefix_wins_and_relayclient_value(rules: RuleSet) -> None:
    r = rules.match("10.1.2.3")
    assert r is not None and r.relayclient == "@fixup"


def test_range_expands_last_octet(rules: RuleSet) -> None:
    for last in range(5, 10):
        r = rules.match(f"192.168.1.{last}")
        assert r is not None and r.relays and r.env["NOTE"] == "range"
    r = rules.match("192.168.1.10")
    assert r is not None and r.pattern == ""  # the default line


def test_cidr_longest_prefix(rules: RuleSet) -> None:
    r = rules.match("172.16.5.9")
    assert r is not None and not r.allow
    r = rules.match("172.20.1.1")
    assert r is not None and r.relays


def test_ipv6_exact_and_cidr(rules: RuleSet) -> None:
    r = rules.match("2001:db8::1")
    assert r is not None and not r.allow
    r = rules.match("2001:db8::2")
    assert r is not None and r.relays
    r = rules.match("::1")
    assert r is not None and r.relays and r.env["X"] == "y"


def test_first_line_wins_for_duplicates(rules: RuleSet) -> None:
    r = rules.match("1.2.3.4")
    assert r is not None and r.allow and not r.relays and r.line == 13


def test_default_line_and_no_default() -> None:
    assert RuleSet.parse("127.0.0.1:allow,RELAYCLIENT=\"\"\n").match("8.8.8.8") is None
    r = RuleSet.parse(":deny\n").match("8.8.8.8")
    assert r is not None and not r.allow


def test_allow_without_relayclient_does_not_relay() -> None:
    r = RuleSet.parse("5.6.7.8:allow\n").match("5.6.7.8")
    assert r is not None and r.allow and not r.relays and r.relayclient is None


def test_ipv4_rule_never_matches_ipv6() -> None:
    rs = RuleSet.parse("0.0.0.0/0:allow,RELAYCLIENT=\"\"\n")
    assert rs.match("::1") is None
    assert rs.match("9.9.9.9") is not None


def test_mapped_cidr_folds_to_ipv4() -> None:
    rs = RuleSet.parse("::ffff:10.0.0.0/104:allow,RELAYCLIENT=\"\"\n")
    r = rs.match("10.1.2.3")
    assert r is not None and r.relays


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("1.2.3.4", "ADDRESS:allow"),
        ("1.2.3.4:permit", "ADDRESS:allow"),
        ("1.2.3.4.5:allow", "bad IPv4"),
        ("1.2.3.256:allow", "bad IPv4"),
        ("1.2.3.9-5:allow", "backwards"),
        ("1.2.3.4:allow,RELAYCLIENT=", "quoted"),
        ("1.2.3.4:allow,RELAYCLIENT=\"x", "unterminated"),
        ("1.2.3.4:allow RELAYCLIENT=\"\"", "expected ','"),
        ("1.2.3.4:allow,BAD-NAME=\"\"", "variable name"),
        ("300.0.0.0/8:allow", "CIDR"),
        ("=host.example:allow", "not supported"),
        ("2001:db8::zz:allow", "IPv6"),
    ],
)
def test_bad_lines_name_file_line_and_value(line: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        RuleSet.parse(f"# ok\n{line}\n", "/etc/relaygate/rules")
    msg = str(ei.value)
    assert needle in msg
    assert "/etc/relaygate/rules:2" in msg
    assert ei.value.line == 2


def test_load_missing_file_names_it(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="not found"):
        RuleSet.load("/nonexistent/rules.txt")


@settings(max_examples=200)
@given(
    net=st.integers(0, 2**32 - 1),
    plen=st.integers(0, 32),
    addr=st.integers(0, 2**32 - 1),
)
def test_cidr_matching_agrees_with_ipaddress_v4(net: int, plen: int, addr: int) -> None:
    network = ipaddress.IPv4Network((net, plen), strict=False)
    rs = RuleSet.parse(f"{network}:allow,RELAYCLIENT=\"\"\n")
    ip = str(ipaddress.IPv4Address(addr))
    assert (rs.match(ip) is not None) == (ipaddress.IPv4Address(addr) in network)


@settings(max_examples=200)
@given(
    net=st.integers(0, 2**128 - 1),
    plen=st.integers(1, 128),
    addr=st.integers(0, 2**128 - 1),
)
def test_cidr_matching_agrees_with_ipaddress_v6(net: int, plen: int, addr: int) -> None:
    network = ipaddress.IPv6Network((net, plen), strict=False)
    if network.network_address.ipv4_mapped is not None:
        return  # mapped networks fold to IPv4; covered above
    rs = RuleSet.parse(f"{network}:allow,RELAYCLIENT=\"\"\n")
    a = ipaddress.IPv6Address(addr)
    if a.ipv4_mapped is not None:
        return
    assert (rs.match(a.compressed) is not None) == (a in network)


@settings(max_examples=200)
@given(octets=st.lists(st.integers(0, 255), min_size=4, max_size=4), depth=st.integers(1, 3))
def test_tcprules_prefix_is_textual_prefix(octets: list[int], depth: int) -> None:
    prefix = ".".join(str(o) for o in octets[:depth]) + "."
    rs = RuleSet.parse(f"{prefix}:allow,RELAYCLIENT=\"\"\n")
    ip = ".".join(str(o) for o in octets)
    assert rs.match(ip) is not None
    other = ".".join(str(o) for o in [(octets[0] + 1) % 256, *octets[1:]])
    assert rs.match(other) is None


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_raises_configerror(text: str) -> None:
    try:
        RuleSet.parse(text)
    except ConfigError:
        pass


def _naive_match(rs: RuleSet, ip: str) -> object:
    """Longest-prefix match the slow way: every network, longest first, file order."""
    if ip in rs.exact:
        return rs.exact[ip]
    addr = ipaddress.ip_address(ip)
    for net, rule in rs.networks:
        if addr.version == net.version and addr in net:
            return rule
    return rs.default


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), st.booleans()),
                max_size=40),
       st.lists(st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)), max_size=15),
       st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
       st.lists(st.integers(0, 2**128 - 1), min_size=1, max_size=10))
def test_prefix_lookup_agrees_with_scanning_every_network(
        v4: list[tuple[int, int, bool]], v6: list[tuple[int, int]],
        probes4: list[int], probes6: list[int]) -> None:
    lines = []
    for number, length, allow in v4:
        net = ipaddress.ip_network((number, length), strict=False)
        lines.append(f"{net}:" + ('allow,RELAYCLIENT=""' if allow else "deny"))
    for number, length in v6:
        lines.append(f"{ipaddress.ip_network((number, length), strict=False)}:deny")
    rs = RuleSet.parse("\n".join(lines))
    # Probe inside the listed networks too, not only at random.
    probes = [str(ipaddress.ip_address(n)) for n in probes4]
    probes += [str(ipaddress.IPv4Address(number)) for number, _, _ in v4]
    probes += [str(ipaddress.ip_address(n)) for n in probes6 if
               ipaddress.IPv6Address(n).ipv4_mapped is None]
    for ip in probes:
        assert rs.match(ip) is _naive_match(rs, ip), ip


# -- relaygate rules validate (issue 17 point 9) -------------------------------------------


def test_rules_validate_reports_every_bad_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from relaygate.cli import main

    good = tmp_path / "good"
    good.write_text('# site\n127.0.0.1:allow,RELAYCLIENT=""\n10.0.0.:allow,RELAYCLIENT=""\n'
                    "192.0.2.9:deny\n:allow\n")
    r = CliRunner().invoke(main, ["rules", "validate", str(good)])
    assert r.exit_code == 0, r.output
    assert f"{good}: OK, 4 rules, 2 relaying, default allow" in r.output
    assert CliRunner().invoke(main, ["rules", "validate", "-q", str(good)]).output == ""

    bad = tmp_path / "bad"
    bad.write_text('127.0.0.1:allow,RELAYCLIENT=""\n1.2.3.999:allow\n'
                   "10.0.0.1:maybe\n2001:db8::/200:deny\n=host.example:allow\n"
                   '192.0.2.1:allow,RELAYCLIENT="x\n')
    r = CliRunner().invoke(main, ["rules", "validate", str(bad)])
    assert r.exit_code == 1
    for line in (2, 3, 4, 5, 6):
        assert f"{bad}:{line}: " in r.output, (line, r.output)
    assert f"{bad}:1:" not in r.output
    assert "1.2.3.999" in r.output and "5 bad lines" in r.output

    r = CliRunner().invoke(main, ["rules", "validate", str(tmp_path / "missing")])
    assert r.exit_code == 111 and "cannot read" in r.output
