"""Trusted proxies: the setting (every source, errors naming it), the network set, and
RelayControl never opening a window for a proxy's own address."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygate.config import load_settings
from relaygate.control import RelayControl, WindowRefused
from relaygate.errors import ConfigError
from relaygate.networks import Networks
from relaygate.stores.memory import MemoryStore


def test_networks_match_v4_v6_and_mapped() -> None:
    nets = Networks(["10.0.0.0/8", "192.0.2.9", "2001:db8::/32", "::ffff:198.51.100.0/120"])
    assert nets.specs == ("10.0.0.0/8", "192.0.2.9/32", "2001:db8::/32", "198.51.100.0/24")
    for ip in ("10.255.0.1", "192.0.2.9", "2001:db8:ffff::1", "198.51.100.200"):
        assert ip in nets
    for ip in ("11.0.0.1", "192.0.2.10", "2001:db9::1", "198.51.101.1", "::1"):
        assert ip not in nets
    assert not Networks() and "10.0.0.1" not in Networks()


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "10.0.0.0/33", "proxy.example", "", "1.2.3"])
def test_networks_refuse_bad_specs(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        Networks([bad], source="here")
    assert info.value.source == "here" and info.value.value == bad


def test_toml_and_env_and_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "relaygate.toml"
    cfg.write_text('trusted_proxies = ["127.0.0.9", "10.1.0.0/16"]\nproxy_timeout = 3\n')
    s = load_settings(config_file=cfg)
    assert s.trusted_proxies == ("127.0.0.9/32", "10.1.0.0/16") and s.proxy_timeout == 3.0
    s = load_settings(environ={"RELAYGATE_TRUSTED_PROXIES": "192.0.2.0/24 ::1"})
    assert s.trusted_proxies == ("192.0.2.0/24", "::1/128")
    s = load_settings(cli={"trusted_proxies": ["192.0.2.1"]}, config_file=cfg)
    assert s.trusted_proxies == ("192.0.2.1/32",)


def test_errors_name_the_source_and_the_value(tmp_path: Path) -> None:
    cfg = tmp_path / "relaygate.toml"
    cfg.write_text('hostname = "mx"\n\ntrusted_proxies = ["127.0.0.9", "10.1.0.1/16"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=cfg)
    assert str(info.value) == (f"{cfg}:3: trusted proxy: host bits set: '10.1.0.1/16'")
    with pytest.raises(ConfigError, match=r"option --trusted-proxy: trusted proxy: not an "
                                          r"address or CIDR: 'lb\.example'"):
        load_settings(cli={"trusted_proxies": ["lb.example"]})
    with pytest.raises(ConfigError, match=r"\$RELAYGATE_TRUSTED_PROXIES"):
        load_settings(environ={"RELAYGATE_TRUSTED_PROXIES": "10.0.0.0/99"})
    with pytest.raises(ConfigError, match="proxy_timeout: must be greater than zero"):
        load_settings(cli={"proxy_timeout": "0"})


def test_no_window_for_a_trusted_proxy() -> None:
    control = RelayControl(MemoryStore(), trusted_proxies=Networks(["127.0.0.9", "fd00::/8"]))
    for ip in ("127.0.0.9", "fd00::1", "::ffff:127.0.0.9"):
        with pytest.raises(WindowRefused):
            control.open_window(ip, user="alice", source="pop3")
        assert not control.decide(ip).allowed
    control.open_window("127.0.0.21", user="alice", source="pop3")
    assert control.decide("127.0.0.21").allowed
    assert control.list() and all(g.ip == "127.0.0.21" for g in control.list())


def test_cli_commands_take_trusted_proxy() -> None:
    from click.testing import CliRunner

    from relaygate.cli import main

    for command in ("serve", "smtpd", "pop3d", "imapd", "policyd"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert "--trusted-proxy CIDR" in result.output, command


def test_dovecot_hook_refuses_a_trusted_proxys_address(tmp_path: Path) -> None:
    """Dovecot behind HAProxy without ``haproxy = yes`` passes the proxy's address."""
    from relaygate.integrations.dovecot import record
    from relaygate.stores import open_store

    db = tmp_path / "g.db"
    cfg = tmp_path / "relaygate.toml"
    cfg.write_text(f'store = "sqlite://{db}"\ntrusted_proxies = ["10.0.0.10"]\n')
    with pytest.raises(ValueError, match=r"10\.0\.0\.10 is a trusted proxy"):
        record({"config": str(cfg)}, {"IP": "10.0.0.10", "USER": "alice@example.org"})
    assert "window.opened ip=192.0.2.7" in record({"config": str(cfg)},
                                                   {"IP": "192.0.2.7", "USER": "alice"})
    store = open_store(f"sqlite://{db}", expiry=900)
    try:
        assert [g.ip for g in store.list(0)] == ["192.0.2.7"]
    finally:
        store.close()


def _context(tmp_path: Path) -> object:
    from relaygate.config import Settings
    from relaygate.context import Context
    from relaygate.mail.directory import StaticDirectory
    from relaygate.metrics import Metrics

    return Context(Settings(data_dir=tmp_path), RelayControl(MemoryStore()), Metrics(),
                   StaticDirectory())


def test_pop3_plaintext_on_a_loopback_listener_is_not_for_forwarded_clients(
        tmp_path: Path) -> None:
    from relaygate.servers.listeners import Listen, Listener
    from relaygate.servers.pop3 import Pop3Service

    svc = Pop3Service(_context(tmp_path))
    loop_listener = Listener("pop3", Listen("127.0.0.1", 110))
    loop_listener.loopback = True  # as bind() finds it
    assert svc._config(loop_listener, "198.51.100.7", False).plaintext_without_tls
    assert not svc._config(loop_listener, "198.51.100.7", False,
                           proxied=True).plaintext_without_tls
    assert svc._config(loop_listener, "127.0.0.21", False, proxied=True).plaintext_without_tls


async def test_smtp_forwarded_clients_get_their_own_auth_rule_and_local_relays_nothing(
        tmp_path: Path) -> None:
    from relaygate.servers.accept import Peer
    from relaygate.servers.smtp.service import ListenerInfo, make_services

    (svc, *_) = make_services(_context(tmp_path))
    info = ListenerInfo("smtp", plaintext_auth=True)  # a loopback listener's
    assert svc.make_protocol(info, Peer("198.51.100.7")).client.plaintext_auth
    forwarded = svc.make_protocol(info, Peer("198.51.100.7", 1, proxy="127.0.0.9"))
    assert not forwarded.client.plaintext_auth and forwarded.client.fixed is None
    local = svc.make_protocol(info, Peer("127.0.0.9", 1, proxy="127.0.0.9", local=True))
    assert local.client.fixed is not None and not local.client.fixed.allowed


def test_log_watcher_opens_no_window_for_a_trusted_proxy(
        caplog: pytest.LogCaptureFixture) -> None:
    """Dovecot behind HAProxy without haproxy = yes logs the proxy's address."""
    from relaygate.integrations.logwatch import window_opener
    from relaygate.protocols.loglines import LoginEvent

    control = RelayControl(MemoryStore(), trusted_proxies=Networks(["10.0.0.10"]))
    handle = window_opener(control)
    handle(LoginEvent("10.0.0.10", "alice", None, "imap", "dovecot"))
    handle(LoginEvent("192.0.2.7", "alice", None, "imap", "dovecot"))
    assert [g.ip for g in control.list()] == ["192.0.2.7"]
    assert "no relay window for 10.0.0.10 (imap login of alice): it is a trusted proxy" \
        in caplog.text
