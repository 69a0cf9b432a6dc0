"""qmail's control/rcpthosts (+ morercpthosts) and TOML domains."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygate.config import Settings
from relaygate.errors import ConfigError
from relaygate.mail.rcpthosts import RcptHosts


def test_qmail_file_format() -> None:
    hosts = RcptHosts.parse(
        "# local domains\n"
        "Example.COM\n"
        "\n"
        ".example.net\n"
        "mail.example.net   \n"
        "[192.0.2.1]\n"
        "bücher.example\n")
    assert "example.com" in hosts
    assert "sub.example.com" not in hosts  # qmail: only a ".example.com" line covers subdomains
    assert "a.example.net" in hosts and "b.a.example.net" in hosts
    assert "example.net" not in hosts  # ".example.net" covers subdomains only
    assert "mail.example.net" in hosts
    assert "[192.0.2.1]" in hosts
    assert "xn--bcher-kva.example" in hosts
    assert "example.org" not in hosts and "notexample.com" not in hosts
    assert hosts.primary == "example.com"


def test_a_local_domain_as_a_prefix_is_not_local() -> None:
    # example.org.evil.test begins with a local domain and a dot: it is evil.test's
    # name, not a local one, whether example.org is an exact line or a ".suffix".
    hosts = RcptHosts.parse("example.org\n.example.net\n")
    for foreign in ("example.org.evil.test", "EXAMPLE.ORG.evil.test.",
                    "a.example.net.evil.test", "example.net.evil.test", "example.orgx",
                    "xexample.org", "example.or"):
        assert not hosts.is_local(foreign), foreign
    assert "example.org.evil.test" not in hosts
    assert hosts.is_local("example.org") and hosts.is_local("a.example.net")


def test_is_local_canonicalises() -> None:
    hosts = RcptHosts.parse("example.com\nbücher.example\n")
    for variant in ("EXAMPLE.com", "example.com.", "XN--BCHER-KVA.example", "BÜCHER.example."):
        assert hosts.is_local(variant), variant
    for other in ("example.com..", "example.co", "xn--bcher-kva-.example", "\uff45xample.com"):
        assert not hosts.is_local(other), other


def test_bad_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "rcpthosts"
    f.write_text("example.com\nbad domain!\n")
    with pytest.raises(ConfigError) as e:
        RcptHosts.build([], [f])
    assert e.value.source == str(f) and e.value.line == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        RcptHosts.build([], [tmp_path / "nope"])


def test_settings_merge_domains_file_and_morercpthosts(tmp_path: Path) -> None:
    (tmp_path / "rcpthosts").write_text("example.com\n")
    (tmp_path / "morercpthosts").write_text("more.example\n.deep.example\n")
    s = Settings(domains=("toml.example",), rcpthosts_file=tmp_path / "rcpthosts",
                 hostname="host.example")
    hosts = RcptHosts.from_settings(s)
    for d in ("toml.example", "example.com", "more.example", "x.deep.example"):
        assert d in hosts, d
    assert hosts.primary == "toml.example"
    assert "host.example" not in hosts


def test_hostname_is_the_default_domain() -> None:
    hosts = RcptHosts.from_settings(Settings(hostname="Mx.Example.org"))
    assert "mx.example.org" in hosts and len(hosts) == 1
