"""The GrantStore contract (stores/base.py), run against every backend.

memory, spool, sqlite, a real redis-server, the same through Redis Sentinel and
on a three-master Redis Cluster, those three again over TLS only (client
certificates required), and a real valkey-server: the same behaviour,
the same refusals, and a store failure always becomes TEMPFAIL, never ALLOW.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import free_port
from relaygate.control import RelayControl
from relaygate.decision import Verdict
from relaygate.errors import InvalidAddress, StoreError
from relaygate.grants import Grant
from relaygate.rules import RuleSet
from relaygate.stores import open_store
from relaygate.stores.base import GrantStore
from relaygate.stores.redis import RedisStore
from relaygate.stores.sqlite import SqliteStore

from .conftest import EXPIRY

# A time with an exact binary fraction, near the real clock (Redis expires keys by
# its own clock, so grants must not be far in the past or future). Taken again at
# the start of every test: a value from collection time is minutes old by the time
# a long suite reaches these tests, and Redis would already have expired grants
# the test still counts as live.
NOW = float(int(time.time())) + 0.25


@pytest.fixture(autouse=True)
def _fresh_now() -> None:
    global NOW
    NOW = float(int(time.time())) + 0.25


def grant(
    ip: str,
    user: str | None = "alice",
    domain: str | None = "example.org",
    *,
    opened: float | None = None,
    ttl: float = EXPIRY,
    source: str = "pop3",
) -> Grant:
    at = NOW if opened is None else opened
    return Grant(ip, user, domain, source, at, at + ttl)


def expected(store: GrantStore, g: Grant) -> Grant:
    """What the store gives back for ``g``: the spool keeps no source."""
    return g.replace(source="qmail") if store.kind == "spool" else g


# -- round trips -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "user", "domain"),
    [
        ("192.0.2.1", "alice", "example.org"),
        ("2001:db8::1", "bob", None),
        ("2001:db8:0:1:2:3:4:5", None, None),
        ("::1", None, "example.net"),
        ("10.0.0.255", "jos\u00e9@example.org", "example.org"),
    ],
)
def test_put_get_round_trip(
    store: GrantStore, ip: str, user: str | None, domain: str | None
) -> None:
    g = grant(ip, user, domain)
    store.put(g)
    assert store.get(ip, NOW) == expected(store, g)
    assert store.get(ip, NOW + 100) == expected(store, g)


def test_get_unknown_is_none(store: GrantStore) -> None:
    assert store.get("192.0.2.99", NOW) is None
    assert store.get("2001:db8::99", NOW) is None


def test_kind_names_the_backend(store: GrantStore) -> None:
    assert store.kind in ("memory", "spool", "sqlite", "redis")
    assert isinstance(store, GrantStore)


def test_refresh_replaces(store: GrantStore) -> None:
    store.put(grant("192.0.2.1", "alice", opened=NOW - 600))
    newer = grant("192.0.2.1", "bob", "example.net", opened=NOW)
    store.put(newer)
    assert store.get("192.0.2.1", NOW) == expected(store, newer)
    assert [g.ip for g in store.list(NOW)] == ["192.0.2.1"]
    # the old window's expiry no longer applies: still open after it
    assert store.get("192.0.2.1", NOW - 600 + EXPIRY + 1) is not None


# -- expiry ------------------------------------------------------------------------


def test_expiry(store: GrantStore) -> None:
    g = grant("192.0.2.1")
    store.put(g)
    assert store.get("192.0.2.1", g.expires_at) == expected(store, g)  # >= now is live
    assert store.get("192.0.2.1", g.expires_at + 1) is None
    assert store.list(g.expires_at + 1) == []


def test_age_removes_exactly_the_expired(store: GrantStore) -> None:
    live = [grant(f"192.0.2.{i}", opened=NOW - 10 * i) for i in range(1, 4)]
    live.append(grant("2001:db8::7", opened=NOW - 5))
    dead = [grant(f"198.51.100.{i}", opened=NOW - EXPIRY - 10 * i) for i in range(1, 6)]
    dead.append(grant("2001:db8::dead", opened=NOW - EXPIRY - 1))
    for g in live + dead:
        store.put(g)
    assert store.age(NOW) == len(dead)
    assert store.age(NOW) == 0
    assert {g.ip for g in store.list(NOW)} == {g.ip for g in live}
    for g in dead:
        assert store.get(g.ip, NOW) is None
    for g in live:
        assert store.get(g.ip, NOW) == expected(store, g)


def test_age_on_empty_store(store: GrantStore) -> None:
    assert store.age(NOW) == 0


# -- delete ------------------------------------------------------------------------


def test_delete(store: GrantStore) -> None:
    store.put(grant("2001:db8::1"))
    store.put(grant("192.0.2.1"))
    assert store.delete("2001:db8::1") is True
    assert store.delete("2001:db8::1") is False
    assert store.get("2001:db8::1", NOW) is None
    assert store.get("192.0.2.1", NOW) is not None


def test_delete_user(store: GrantStore) -> None:
    store.put(grant("192.0.2.1", "alice"))
    store.put(grant("2001:db8::1", "alice"))
    store.put(grant("192.0.2.2", "bob"))
    store.put(grant("192.0.2.3", None))
    assert store.delete_user("alice") == 2
    assert store.delete_user("alice") == 0
    assert store.delete_user("nobody") == 0
    assert sorted(g.ip for g in store.list(NOW)) == ["192.0.2.2", "192.0.2.3"]


def test_delete_user_spares_a_later_login_by_someone_else(store: GrantStore) -> None:
    store.put(grant("192.0.2.1", "alice", opened=NOW - 60))
    store.put(grant("192.0.2.1", "bob", opened=NOW))  # bob logs in from the same NAT address
    assert store.delete_user("alice") == 0
    got = store.get("192.0.2.1", NOW)
    assert got is not None and got.user == "bob"
    assert store.delete_user("bob") == 1


# -- list ----------------------------------------------------------------------------


def test_list_live_only_oldest_first(store: GrantStore) -> None:
    gs = [
        grant("192.0.2.5", "e", opened=NOW - 10),
        grant("192.0.2.1", "a", opened=NOW - 300),
        grant("2001:db8::2", "c", opened=NOW - 100),
        grant("2001:db8::1", "b", opened=NOW - 100),  # same opened_at: ordered by ip
        grant("192.0.2.9", "x", opened=NOW - EXPIRY - 1),  # expired
    ]
    for g in gs:
        store.put(g)
    got = store.list(NOW)
    assert [g.user for g in got] == ["a", "b", "c", "e"]
    assert got == [expected(store, g) for g in sorted(gs[:4], key=lambda g: (g.opened_at, g.ip))]


def test_list_empty(store: GrantStore) -> None:
    assert store.list(NOW) == []


# -- bad input never reaches the backend ------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["../x", "..", "/etc/passwd", "", "1.2.3.4.5", "fe80::1%eth0", "01.2.3.4", " 192.0.2.1",
     "::FFFF:192.0.2.1", "::ffff:192.0.2.1", "2001:DB8::1", "2001:db8:0::1", "x"],
)
def test_non_canonical_addresses_are_refused(store: GrantStore, bad: str) -> None:
    with pytest.raises(InvalidAddress):
        store.put(grant(bad))
    with pytest.raises(InvalidAddress):
        store.get(bad, NOW)
    with pytest.raises(InvalidAddress):
        store.delete(bad)
    assert store.list(NOW) == []


# -- concurrency --------------------------------------------------------------------------


def test_threads(store: GrantStore) -> None:
    def work(t: int) -> int:
        seen = 0
        for i in range(40):
            ip = f"10.{t}.0.{i}"
            store.put(grant(ip, f"user{t}", opened=NOW - i))
            got = store.get(ip, NOW)
            assert got is not None and got.user == f"user{t}"
            seen += 1
        return seen

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(work, range(8))) == 320
    assert len(store.list(NOW)) == 320
    assert store.delete_user("user3") == 40


# -- decisions through RelayControl ---------------------------------------------------------


def test_decide_allows_a_live_grant_and_names_the_user(store: GrantStore) -> None:
    control = RelayControl(store, expiry=EXPIRY, relayclient="")
    control.open_window("::ffff:192.0.2.44", user="alice", domain="example.org", source="pop3",
                        now=NOW)
    d = control.decide("192.0.2.44", NOW + 1)
    assert d.verdict is Verdict.ALLOW and d.user == "alice" and d.relayclient == ""
    assert control.decide("192.0.2.45", NOW + 1).verdict is Verdict.DENY
    assert control.decide("192.0.2.44", NOW + EXPIRY + 1).verdict is Verdict.DENY


# -- unreachable backends ----------------------------------------------------------------------

BROKEN = ("spool-removed", "spool-not-a-directory", "sqlite-directory", "sqlite-corrupt",
          "redis-refused", "redis-sentinel-refused", "redis-cluster-refused")


@pytest.fixture(params=BROKEN)
def broken_store(
    request: pytest.FixtureRequest, tmp_path: Path, make_store: Callable[[str], GrantStore]
) -> GrantStore:
    how = request.param
    if how.startswith("spool"):
        s = make_store("spool")
        spool = Path(s.path)  # type: ignore[attr-defined]
        s.put(grant("192.0.2.1"))
        shutil.rmtree(spool)
        if how == "spool-not-a-directory":
            spool.write_bytes(b"")
        return s
    if how == "sqlite-directory":
        (tmp_path / "grants.db").mkdir()
        return SqliteStore(tmp_path / "grants.db", busy_timeout=0.05)
    if how == "sqlite-corrupt":
        (tmp_path / "grants.db").write_bytes(b"this is not an sqlite database\n" * 200)
        return SqliteStore(tmp_path / "grants.db", busy_timeout=0.05)
    if how == "redis-sentinel-refused":  # no sentinel answers: no master is known
        return open_store(f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/rg")
    if how == "redis-cluster-refused":  # no startup node answers
        return open_store(f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}")
    return RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")


def test_unreachable_store_raises_store_error(broken_store: GrantStore) -> None:
    with pytest.raises(StoreError):
        broken_store.put(grant("192.0.2.1"))
    with pytest.raises(StoreError):
        broken_store.get("192.0.2.1", NOW)
    with pytest.raises(StoreError):
        broken_store.get("192.0.2.2", NOW)  # a miss must not hide the failure either
    with pytest.raises(StoreError):
        broken_store.delete("192.0.2.1")
    with pytest.raises(StoreError):
        broken_store.delete_user("alice")
    with pytest.raises(StoreError):
        broken_store.age(NOW)
    with pytest.raises(StoreError):
        broken_store.list(NOW)
    broken_store.close()


def test_unreachable_store_is_tempfail_never_allow(broken_store: GrantStore) -> None:
    control = RelayControl(broken_store, RuleSet.parse("10.9.9.9:allow,RELAYCLIENT=\"\"\n"),
                           expiry=EXPIRY)
    d = control.decide("192.0.2.1", NOW)
    assert d.verdict is Verdict.TEMPFAIL
    assert d.kind == "store"
    assert control.decide("2001:db8::1", NOW).verdict is Verdict.TEMPFAIL
    # a static rule does not need the store
    assert control.decide("10.9.9.9", NOW).verdict is Verdict.ALLOW
    with pytest.raises(StoreError):
        control.open_window("192.0.2.1", user="alice", source="pop3", now=NOW)
