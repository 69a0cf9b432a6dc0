"""smtproutes parsing and lookup; MX/A/AAAA resolution with a stub and a loopback DNS server.

No test here queries real DNS: StaticResolver answers from dictionaries, and
DnsPythonResolver is pointed at a tiny DNS server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rrset
import pytest

from relaygate.errors import ConfigError
from relaygate.mail.delivery.routes import (
    MAX_TARGETS,
    DnsError,
    DnsPythonResolver,
    Relay,
    Routes,
    RoutingError,
    StaticResolver,
    Target,
    parse_line,
    resolve_targets,
)

from ..test_queue_helpers import make_settings

# -- smtproutes -----------------------------------------------------------------


@pytest.mark.parametrize("line, key, relay", [
    ("example.com:mx.example.net", "example.com", Relay("mx.example.net", 25)),
    ("Example.COM:MX.example.net:2525", "example.com", Relay("mx.example.net", 2525)),
    (".example.com:relay.example.net", ".example.com", Relay("relay.example.net")),
    ("lists.example.com:", "lists.example.com", None),
    (":smarthost.example.net", "", Relay("smarthost.example.net")),
    (":127.0.0.1:2525", "", Relay("127.0.0.1", 2525)),
    (":[::1]:2525", "", Relay("::1", 2525)),
    ("v6.test:[IPv6:2001:DB8::1]", "v6.test", Relay("2001:db8::1", 25)),
    ("b\u00fccher.test:[127.0.0.2]", "b\u00fccher.test", Relay("127.0.0.2")),
])
def test_parse_good_lines(line: str, key: str, relay: Relay | None) -> None:
    route = parse_line(line, source="f", line=3)
    assert route.key == key
    assert route.relay == relay
    assert route.origin == "f:3"


@pytest.mark.parametrize("line", [
    "no-colon-here",
    "example.com:::1:25",
    "example.com:[::1",
    "example.com:[not-an-ip]:25",
    "example.com:[::1]x",
    "example.com:host:0",
    "example.com:host:70000",
    "example.com:host:port",
    "bad domain:host",
    "-bad.example:host",
    "example.com:bad host",
    "example..com:host",
])
def test_parse_bad_lines(line: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_line(line, source="/etc/relaygate/smtproutes", line=7)
    assert err.value.source == "/etc/relaygate/smtproutes"
    assert err.value.line == 7
    assert err.value.value == line


def test_lookup_order_is_qmails() -> None:
    routes = Routes.parse([
        "# comment", "",
        "example.com:exact.relay",
        ".example.com:sub.relay",
        ".deep.example.com:deep.relay",
        "mx.example.com:",
        ":default.relay",
    ], source="t")
    assert len(routes) == 5

    def relay(domain: str) -> str | None:
        r = routes.lookup(domain)
        assert r is not None
        return r.relay.host if r.relay else None

    assert relay("example.com") == "exact.relay"
    assert relay("EXAMPLE.com.") == "exact.relay"
    assert relay("a.example.com") == "sub.relay"
    assert relay("x.deep.example.com") == "deep.relay"
    assert relay("deep.example.com") == "sub.relay"
    assert relay("mx.example.com") is None
    assert relay("example.org") == "default.relay"
    assert Routes.parse(["example.com:r"], source="t").lookup("other.org") is None


def test_first_line_for_a_key_wins_and_toml_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "smtproutes"
    f.write_text("example.com:from-file\nexample.org:file-only\nexample.com:second\n")
    settings = make_settings(tmp_path).replace(smtproutes_file=f,
                                               smtproutes=("example.com:from-toml",))
    routes = Routes.from_settings(settings)
    assert routes.lookup("example.com").relay == Relay("from-toml")
    assert routes.lookup("example.org").relay == Relay("file-only")


def test_from_settings_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "smtproutes"
    f.write_text("# routes\nexample.com:ok\n\nexample.org:[::1\n")
    with pytest.raises(ConfigError) as err:
        Routes.from_settings(make_settings(tmp_path).replace(smtproutes_file=f))
    assert (err.value.source, err.value.line, err.value.value) == (str(f), 4, "example.org:[::1")
    assert str(f) in str(err.value) and ":4:" in str(err.value)
    with pytest.raises(ConfigError) as err:
        Routes.from_settings(make_settings(tmp_path).replace(smtproutes=("ok:x", "bad")))
    assert err.value.line == 2
    with pytest.raises(ConfigError):
        Routes.from_settings(make_settings(tmp_path).replace(smtproutes_file=tmp_path / "no"))


# -- resolution with the stub resolver --------------------------------------------


async def test_relay_route_resolves_a_only() -> None:
    r = StaticResolver(hosts={"relay.test": ["127.0.0.1", "::1"]},
                       mx_records={"relay.test": [(10, "elsewhere.test")]})
    route = parse_line("x.test:relay.test:2525")
    targets = await resolve_targets("x.test", route, r)
    assert targets == [Target("relay.test", "127.0.0.1", 2525), Target("relay.test", "::1", 2525)]
    assert ("relay.test", "MX") not in r.queries


async def test_relay_literal_needs_no_dns() -> None:
    r = StaticResolver()
    targets = await resolve_targets("x.test", parse_line(":[::1]:2600"), r)
    assert targets == [Target("::1", "::1", 2600)]
    assert r.queries == []


async def test_relay_without_address_defers() -> None:
    with pytest.raises(RoutingError) as err:
        await resolve_targets("x.test", parse_line(":nowhere.test"), StaticResolver())
    assert not err.value.permanent and err.value.status == "4.4.3"


async def test_mx_preference_order_and_shuffle_of_equals() -> None:
    r = StaticResolver(
        mx_records={"d.test": [(20, "c.test"), (10, "a.test"), (10, "b.test"), (30, "x.test")]},
        hosts={"a.test": ["127.0.0.1"], "b.test": ["127.0.0.2"], "c.test": ["127.0.0.3"]})
    seen = set()
    for seed in range(20):
        targets = await resolve_targets("d.test", None, r, rng=random.Random(seed))
        hosts = [t.host for t in targets]
        assert sorted(hosts[:2]) == ["a.test", "b.test"]
        assert hosts[2] == "c.test"
        assert len(hosts) == 3  # x.test has no address (NXDOMAIN) and is skipped
        seen.add(tuple(hosts[:2]))
    assert len(seen) == 2


async def test_mx_targets_capped() -> None:
    r = StaticResolver(mx_records={"d.test": [(i, f"h{i}.test") for i in range(20)]},
                       hosts={f"h{i}.test": ["127.0.0.1", "127.0.0.2"] for i in range(20)})
    assert len(await resolve_targets("d.test", None, r)) == MAX_TARGETS


async def test_null_mx_is_permanent() -> None:
    r = StaticResolver(mx_records={"d.test": [(0, ".")]})
    with pytest.raises(RoutingError) as err:
        await resolve_targets("d.test", None, r)
    assert (err.value.code, err.value.status, err.value.permanent) == (556, "5.1.10", True)


async def test_null_mx_mixed_with_real_mx_is_ignored() -> None:
    r = StaticResolver(mx_records={"d.test": [(0, "."), (10, "mx.test")]},
                       hosts={"mx.test": ["127.0.0.1"]})
    assert [t.host for t in await resolve_targets("d.test", None, r)] == ["mx.test"]


async def test_implicit_mx_uses_the_domains_address() -> None:
    r = StaticResolver(hosts={"d.test": ["127.0.0.1", "::1"]})
    targets = await resolve_targets("d.test", None, r, port=2525)
    assert targets == [Target("d.test", "127.0.0.1", 2525), Target("d.test", "::1", 2525)]


async def test_nxdomain_is_permanent_servfail_temporary() -> None:
    with pytest.raises(RoutingError) as err:
        await resolve_targets("gone.test", None, StaticResolver())
    assert err.value.permanent and err.value.status == "5.1.2"
    r = StaticResolver(failures={"d.test": DnsError("d.test", "MX", "SERVFAIL",
                                                    permanent=False)})
    with pytest.raises(RoutingError) as err:
        await resolve_targets("d.test", None, r)
    assert not err.value.permanent and err.value.status == "4.4.3"


async def test_mx_hosts_with_temporary_failures_defer() -> None:
    r = StaticResolver(mx_records={"d.test": [(10, "mx.test")]},
                       failures={"mx.test": DnsError("mx.test", "A", "timeout",
                                                     permanent=False)})
    with pytest.raises(RoutingError) as err:
        await resolve_targets("d.test", None, r)
    assert not err.value.permanent


async def test_mx_hosts_without_any_address_is_permanent() -> None:
    r = StaticResolver(mx_records={"d.test": [(10, "gone.test")]})
    with pytest.raises(RoutingError) as err:
        await resolve_targets("d.test", None, r)
    assert err.value.permanent and err.value.status == "5.4.4"


async def test_we_are_the_best_mx_is_a_loop() -> None:
    r = StaticResolver(mx_records={"d.test": [(10, "relay.test"), (20, "backup.test")]},
                       hosts={"relay.test": ["127.0.0.1"], "backup.test": ["127.0.0.2"]})
    with pytest.raises(RoutingError) as err:
        await resolve_targets("d.test", None, r, local_names=("relay.test",))
    assert err.value.permanent and err.value.status == "5.4.6"
    r2 = StaticResolver(mx_records={"d.test": [(5, "primary.test"), (10, "relay.test")]},
                        hosts={"primary.test": ["127.0.0.3"], "relay.test": ["127.0.0.1"]})
    targets = await resolve_targets("d.test", None, r2, local_names=("relay.test",))
    assert [t.host for t in targets] == ["primary.test"]


async def test_address_literal_domains() -> None:
    r = StaticResolver()
    assert await resolve_targets("[127.0.0.1]", None, r, port=26) == [
        Target("127.0.0.1", "127.0.0.1", 26)]
    assert (await resolve_targets("[IPv6:::1]", None, r))[0].address == "::1"
    with pytest.raises(RoutingError):
        await resolve_targets("[not.an.ip]", None, r)
    assert r.queries == []


# -- DnsPythonResolver against a loopback DNS server ----------------------------------


class FakeDns(asyncio.DatagramProtocol):
    """Answers from ``zone`` (name -> rdtype -> [rdata text]); ``rcodes`` force errors;
    names in ``silent`` get no answer at all (a timeout)."""

    def __init__(self) -> None:
        self.zone: dict[str, dict[str, list[str]]] = {}
        self.rcodes: dict[str, int] = {}
        self.silent: set[str] = set()
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[tuple[str, str]] = []

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        query = dns.message.from_wire(data)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return
        resp = dns.message.make_response(query)
        if name in self.rcodes:
            resp.set_rcode(self.rcodes[name])
        elif name not in self.zone:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        else:
            texts = self.zone[name].get(rdtype, [])
            if texts:
                resp.answer.append(dns.rrset.from_text_list(q.name, 300, "IN", rdtype, texts))
        assert self.transport is not None
        self.transport.sendto(resp.to_wire(), addr)


@pytest.fixture
async def fake_dns() -> AsyncIterator[tuple[FakeDns, DnsPythonResolver]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(FakeDns, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    inner = dns.asyncresolver.Resolver(configure=False)
    inner.nameservers = ["127.0.0.1"]
    inner.port = port
    inner.timeout = 0.3
    yield proto, DnsPythonResolver(inner, timeout=0.6)
    transport.close()


async def test_dnspython_mx_and_addresses(fake_dns) -> None:
    server, resolver = fake_dns
    server.zone = {
        "d.test": {"MX": ["10 mx1.d.test.", "20 mx2.d.test."]},
        "mx1.d.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "mx2.d.test": {"AAAA": ["::1"]},
        "nomx.test": {"A": ["127.0.0.5"]},
        "null.test": {"MX": ["0 ."]},
    }
    assert sorted(await resolver.mx("d.test")) == [(10, "mx1.d.test"), (20, "mx2.d.test")]
    assert await resolver.addresses("mx1.d.test") == ["127.0.0.1", "::1"]
    assert await resolver.mx("nomx.test") == []
    targets = await resolve_targets("d.test", None, resolver, port=2525)
    assert [(t.host, t.address) for t in targets] == [
        ("mx1.d.test", "127.0.0.1"), ("mx1.d.test", "::1"), ("mx2.d.test", "::1")]
    assert [t.address for t in await resolve_targets("nomx.test", None, resolver)] == [
        "127.0.0.5"]
    with pytest.raises(RoutingError) as err:
        await resolve_targets("null.test", None, resolver)
    assert err.value.status == "5.1.10"


async def test_dnspython_nxdomain_permanent(fake_dns) -> None:
    _, resolver = fake_dns
    with pytest.raises(DnsError) as err:
        await resolver.mx("missing.test")
    assert err.value.permanent
    with pytest.raises(RoutingError) as rerr:
        await resolve_targets("missing.test", None, resolver)
    assert rerr.value.permanent


async def test_dnspython_servfail_is_temporary(fake_dns) -> None:
    server, resolver = fake_dns
    server.rcodes["broken.test"] = dns.rcode.SERVFAIL
    with pytest.raises(DnsError) as err:
        await resolver.mx("broken.test")
    assert not err.value.permanent
    with pytest.raises(RoutingError) as rerr:
        await resolve_targets("broken.test", None, resolver)
    assert not rerr.value.permanent and rerr.value.code == 451


async def test_dnspython_timeout_is_temporary(fake_dns) -> None:
    server, resolver = fake_dns
    server.silent.add("slow.test")
    with pytest.raises(DnsError) as err:
        await resolver.mx("slow.test")
    assert not err.value.permanent
    assert "timeout" in err.value.why
