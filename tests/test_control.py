"""RelayControl: rules first, then grants; failures are TEMPFAIL, never ALLOW."""

from __future__ import annotations

import logging

import pytest

from relaygate.control import RelayControl
from relaygate.decision import Verdict
from relaygate.errors import InvalidAddress, StoreError
from relaygate.grants import Grant
from relaygate.rules import RuleSet
from relaygate.stores.memory import MemoryStore

NOW = 1_700_000_000.0


class BrokenStore(MemoryStore):
    kind = "broken"

    def get(self, ip: str, now: float) -> Grant | None:
        raise StoreError("connection refused")


def make(rules: str = "", store: MemoryStore | None = None, **kw: object) -> RelayControl:
    return RelayControl(store or MemoryStore(), RuleSet.parse(rules), **kw)  # type: ignore[arg-type]


def test_no_rule_no_grant_denies() -> None:
    d = make().decide("192.0.2.1", NOW)
    assert d.verdict is Verdict.DENY and d.kind == "none" and d.relayclient is None


def test_window_allows_until_expiry_then_denies() -> None:
    c = make(expiry=600)
    g = c.open_window("::ffff:192.0.2.7", user="alice", domain="example.test", source="pop3",
                      now=NOW)
    assert g.ip == "192.0.2.7" and g.expires_at == NOW + 600
    d = c.decide("192.0.2.7", NOW + 600)
    assert d.allowed and d.user == "alice" and d.source == "pop3" and d.relayclient == ""
    assert "alice" in d.reason and "pop3" in d.reason
    assert c.decide("192.0.2.7", NOW + 600.5).verdict is Verdict.DENY


def test_window_for_one_address_does_not_open_another() -> None:
    c = make()
    c.open_window("192.0.2.7", user="alice", source="imap", now=NOW)
    assert not c.decide("192.0.2.8", NOW).allowed
    assert not c.decide("::1", NOW).allowed


def test_rule_relayclient_value_and_reason() -> None:
    c = make('10.0.0.:allow,RELAYCLIENT="@fixup"\n')
    d = c.decide("10.0.0.9", NOW)
    assert d.allowed and d.relayclient == "@fixup" and d.kind == "rule"
    assert "<rules>:1" in d.reason


def test_deny_rule_beats_grant() -> None:
    c = make("192.0.2.7:deny\n")
    c.open_window("192.0.2.7", user="alice", source="pop3", now=NOW)
    d = c.decide("192.0.2.7", NOW)
    assert d.verdict is Verdict.DENY and d.kind == "rule-deny"


def test_allow_rule_without_relayclient_falls_through_to_grants() -> None:
    c = make(":allow\n")
    assert not c.decide("192.0.2.7", NOW).allowed
    c.open_window("192.0.2.7", user="bob", source="pop3", now=NOW)
    assert c.decide("192.0.2.7", NOW).allowed


def test_settings_relayclient_is_given_to_windows() -> None:
    c = make(relayclient="@relay")
    c.open_window("192.0.2.7", user="bob", source="pop3", now=NOW)
    assert c.decide("192.0.2.7", NOW).relayclient == "@relay"


def test_store_failure_is_tempfail_never_allow() -> None:
    c = make(store=BrokenStore())
    d = c.decide("192.0.2.7", NOW)
    assert d.verdict is Verdict.TEMPFAIL and d.kind == "store" and not d.allowed


def test_store_failure_does_not_hide_static_rules() -> None:
    c = make('127.0.0.1:allow,RELAYCLIENT=""\n', store=BrokenStore())
    assert c.decide("127.0.0.1", NOW).allowed


@pytest.mark.parametrize("bad", ["../x", "1.2.3.4.5", "fe80::1%eth0", "", " 1.2.3.4", "a/b"])
def test_invalid_address_denied_and_never_reaches_store(bad: str) -> None:
    class Spy(MemoryStore):
        def get(self, ip: str, now: float) -> Grant | None:
            raise AssertionError("store must not be asked")

    d = make(store=Spy()).decide(bad, NOW)
    assert d.verdict is Verdict.DENY and d.kind == "invalid"
    with pytest.raises(InvalidAddress):
        make(store=Spy()).open_window(bad, user="x", source="cli", now=NOW)


def test_revoke_and_revoke_user_and_age() -> None:
    c = make(expiry=100)
    c.open_window("192.0.2.1", user="alice", source="pop3", now=NOW)
    c.open_window("192.0.2.2", user="alice", source="imap", now=NOW)
    c.open_window("192.0.2.3", user="bob", source="pop3", now=NOW - 200)
    assert c.revoke("192.0.2.1") is True
    assert c.revoke("192.0.2.1") is False
    assert c.revoke_user("alice") == 1
    assert c.age(NOW) == 1
    assert c.list(NOW) == []


def test_refresh_replaces_window() -> None:
    c = make(expiry=100)
    c.open_window("192.0.2.1", user="alice", source="pop3", now=NOW)
    c.open_window("192.0.2.1", user="carol", source="imap", now=NOW + 50)
    (g,) = c.list(NOW + 120)
    assert g.user == "carol" and g.expires_at == NOW + 150


def test_expiry_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make(expiry=0)


def test_decide_canonical_is_decide_without_the_parsing() -> None:
    c = make("192.0.2.0/24:allow,RELAYCLIENT=\"@x\"\n10.0.0.1:deny", relayclient="+r")
    c.open_window("2001:db8::7", user="bob", domain="example.test", source="imap", now=NOW)
    c.open_window("10.0.0.1", user="eve", source="pop3", now=NOW)
    for ip in ("192.0.2.9", "10.0.0.1", "2001:db8::7", "2001:db8::8"):
        assert c.decide_canonical(ip, NOW) == c.decide(ip, NOW), ip
    d = c.decide_canonical("2001:db8::7", NOW)
    assert (d.verdict, d.kind, d.relayclient, d.user, d.domain, d.source) == \
        (Verdict.ALLOW, "grant", "+r", "bob", "example.test", "imap")
    assert "bob" in d.reason and "imap" in d.reason and "expires in 900s" in d.reason
    assert c.decide_canonical("10.0.0.1", NOW).kind == "rule-deny"


class SwitchStore(MemoryStore):
    """A store whose lookups fail while ``down`` is set."""

    down = False

    def get(self, ip: str, now: float) -> Grant | None:
        if self.down:
            raise StoreError("connection refused")
        return super().get(ip, now)


def test_a_store_that_stays_down_is_warned_about_without_a_flood(
        caplog: pytest.LogCaptureFixture) -> None:
    store = SwitchStore()
    c = make(store=store)
    store.down = True
    with caplog.at_level(logging.WARNING, logger="relaygate.control"):
        for i in range(50):
            assert c.decide(f"192.0.2.{i}", NOW).verdict is Verdict.TEMPFAIL
        warned = [r.getMessage() for r in caplog.records]
        assert warned == ["grant store unreachable, refusing to relay for 192.0.2.0: "
                          "connection refused"]
        c.health.interval = 0.0  # the next failure is due a reminder
        c.decide("192.0.2.99", NOW)
        assert "still unreachable" in caplog.records[-1].getMessage()
        assert "49 more refused since the last warning" in caplog.records[-1].getMessage()
        store.down = False
        assert c.decide("192.0.2.1", NOW).verdict is Verdict.DENY
        c.decide("192.0.2.1", NOW)
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == 3 and "reachable again" in msgs[2]
        assert "51 relay decisions were refused" in msgs[2]
        # A new outage is a new first warning.
        store.down = True
        c.decide("192.0.2.5", NOW)
        assert caplog.records[-1].getMessage().startswith("grant store unreachable")


def test_grant_keeps_its_values_and_refuses_changes() -> None:
    g = Grant("192.0.2.7", "alice", "example.org", "pop3", 10, 20)
    assert (g.ip, g.user, g.domain, g.source) == ("192.0.2.7", "alice", "example.org", "pop3")
    assert (g.opened_at, g.expires_at) == (10.0, 20.0)
    assert isinstance(g.opened_at, float) and isinstance(g.expires_at, float)
    with pytest.raises(AttributeError):
        g.user = "mallory"  # type: ignore[misc]
    assert g.replace(user="bob") == Grant("192.0.2.7", "bob", "example.org", "pop3", 10.0, 20.0)
