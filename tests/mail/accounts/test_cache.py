"""The verified-credential cache (``auth.cache_ttl``): what a hit skips and what it never skips."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from prometheus_client import generate_latest

from relaygate.config import AuthSettings, load_settings
from relaygate.errors import ConfigError
from relaygate.mail.accounts import db as accounts_db
from relaygate.mail.accounts.cache import CredentialCache
from relaygate.mail.accounts.db import VERIFY_WORKERS, UserDB
from relaygate.metrics import Metrics

AUTH = AuthSettings(failure_delay=0.0, throttle_failures=3, throttle_window=60.0,
                    throttle_lockout=120.0, cache_ttl=60.0, cache_size=100)


class CountingHasher(PasswordHasher):
    """Counts full password checks."""

    checks = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        type(self).checks += 1
        return bool(super().verify(hash, password))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_db(tmp_path: Path, auth: AuthSettings = AUTH, cache: CredentialCache | None = None,
            users: tuple[str, ...] = ("alice",)) -> UserDB:
    data = tmp_path / "data"
    db = UserDB(data / "users.db", auth, data,
                hasher=CountingHasher(time_cost=1, memory_cost=8, parallelism=1),
                default_domain="example.test", cache=cache)
    for user in users:
        db.add(user, f"pw-{user}")
    CountingHasher.checks = 0
    return db


def other_process(tmp_path: Path, code: str) -> None:
    """Run ``code`` with ``db`` (the same users.db, its own connection) in a new interpreter."""
    data = tmp_path / "data"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from argon2 import PasswordHasher
        from relaygate.config import AuthSettings
        from relaygate.mail.accounts.db import VERIFY_WORKERS, UserDB
        data = Path({str(data)!r})
        db = UserDB(data / "users.db", AuthSettings(), data,
                    hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
                    default_domain="example.test")
    """) + code + "\ndb.close()\n"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


async def test_off_by_default(tmp_path: Path) -> None:
    db = make_db(tmp_path, AuthSettings(failure_delay=0.0))
    assert db.cache is None and db.cache_stats() is None
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    assert CountingHasher.checks == 2
    db.close()


async def test_a_hit_skips_the_password_check(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    for _ in range(5):
        result = await db.authenticate("alice", "pw-alice", "127.0.0.2")
        assert result.ok and result.account is not None
        assert result.account.login == "alice"
    # Typed as the primary address it is the same account, so the same entry.
    assert (await db.authenticate("Alice@Example.Test", "pw-alice", "127.0.0.2")).ok
    assert CountingHasher.checks == 1
    assert db.cache_stats() == (5, 1, 1)
    db.close()


async def test_a_wrong_password_after_a_cached_right_one_fails(tmp_path: Path) -> None:
    auth = AuthSettings(failure_delay=0.0, throttle_failures=10, cache_ttl=60.0)
    db = make_db(tmp_path, auth, users=("alice", "bob"))
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    for wrong in ("pw-alicE", "pw-alice ", "", "pw-bob"):
        assert not (await db.authenticate("alice", wrong, "127.0.0.3")).ok
    # Each wrong one cost a full check; another user's password is no key to alice.
    assert CountingHasher.checks == 1 + 4
    assert (await db.authenticate("bob", "pw-bob", "127.0.0.4")).ok
    assert not (await db.authenticate("bob", "pw-alice", "127.0.0.4")).ok
    assert CountingHasher.checks == 1 + 4 + 2
    db.close()


async def test_failures_are_never_cached(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    for _ in range(2):
        assert not (await db.authenticate("alice", "wrong", "127.0.0.2")).ok
        assert not (await db.authenticate("ghost", "pw-alice", "127.0.0.3")).ok
    assert CountingHasher.checks == 4
    assert db.cache is not None and len(db.cache) == 0
    db.close()


async def test_passwd_in_another_process_invalidates_at_once(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    other_process(tmp_path, "db.set_password('alice', 'pw-new')")
    # No reload interval to wait for: the row is read on every login.
    assert not (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    assert (await db.authenticate("alice", "pw-new", "127.0.0.2")).ok
    assert CountingHasher.checks == 3
    db.close()


async def test_passwd_to_the_same_password_still_invalidates(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    other_process(tmp_path, "db.set_password('alice', 'pw-alice')")
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    assert CountingHasher.checks == 2  # a new salt: checked again
    db.close()


async def test_disable_in_another_process_invalidates_at_once(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    other_process(tmp_path, "db.set_enabled('alice', False)")
    result = await db.authenticate("alice", "pw-alice", "127.0.0.2")
    assert not result.ok and not result.throttled
    other_process(tmp_path, "db.set_enabled('alice', True)")
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    db.close()


async def test_del_in_another_process_invalidates_at_once(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The account list itself may be RELOAD_CHECK_INTERVAL (1 s) old: a user added
    # elsewhere shows up within that. The cache is what is tested here, so the list
    # is re-checked at every login (else the re-created user is missed whenever the
    # two subprocesses take less than a second: a flaky failure).
    monkeypatch.setattr(accounts_db, "RELOAD_CHECK_INTERVAL", 0.0)
    db = make_db(tmp_path)
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    other_process(tmp_path, "db.delete('alice')")
    assert not (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    # Re-created with the same password: a new row, a new hash, a new check.
    other_process(tmp_path, "db.add('alice', 'pw-alice')")
    checks = CountingHasher.checks
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    assert CountingHasher.checks == checks + 1
    db.close()


async def test_the_users_command_invalidates(tmp_path: Path) -> None:
    # The real CLI, in its own process, against the same database.
    db = make_db(tmp_path)
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "relaygate", "--data-dir", str(data), "users",
                    "disable", "alice"], check=True, capture_output=True, timeout=60)
    assert not (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    db.close()


async def test_sighup_reload_empties_the_cache(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    db.reload()
    assert db.cache is not None and len(db.cache) == 0
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    assert CountingHasher.checks == 2
    db.close()


async def test_a_cached_login_is_still_locked_out(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    for i in range(3):  # throttle_failures = 3, each from its own address
        assert not (await db.authenticate("alice", f"guess{i}", f"127.0.1.{i}")).ok
    result = await db.authenticate("alice", "pw-alice", "127.0.0.2")
    assert not result.ok and result.throttled
    assert db.cache_stats() == (0, 4, 1)  # refused before the cache was asked
    # The same from a locked address, for another user whose login is cached.
    db2 = make_db(tmp_path / "two", users=("bob",))
    assert (await db2.authenticate("bob", "pw-bob", "127.0.2.1")).ok
    for i in range(3):
        await db2.authenticate(f"ghost{i}", "x", "127.0.2.1")
    assert (await db2.authenticate("bob", "pw-bob", "127.0.2.1")).throttled
    db.close()
    db2.close()


async def test_concurrent_guesses_are_counted_as_without_the_cache(tmp_path: Path) -> None:
    # The right password is cached; 19 guesses and then the right one arrive at
    # once from one address: only the budget (3) is checked, the right one is
    # refused unchecked, as without a cache.
    db = make_db(tmp_path)
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.9")).ok
    CountingHasher.checks = 0
    guesses = [db.authenticate("alice", f"guess{i}", "127.0.5.1") for i in range(19)]
    guesses.append(db.authenticate("alice", "pw-alice", "127.0.5.1"))
    results = await asyncio.gather(*guesses)
    assert not any(r.ok for r in results)
    assert results[-1].throttled
    assert sum(not r.throttled for r in results) == 3
    assert CountingHasher.checks == 3
    assert db.throttle.in_flight("127.0.5.1", "alice") == (0, 0)
    db.close()


async def test_a_cached_hit_for_a_disabled_user_counts_as_a_failure(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    db.set_enabled("alice", False)
    for _ in range(3):
        assert not (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    assert db.throttle.locked("127.0.0.2", "alice")
    db.close()


class BlockingHasher(PasswordHasher):
    """A check that waits until the test releases it."""

    release = threading.Event()

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        type(self).release.wait(30)
        return bool(super().verify(hash, password))


async def test_a_hit_does_not_wait_behind_full_checks(tmp_path: Path) -> None:
    auth = AuthSettings(failure_delay=0.0, throttle_failures=20, cache_ttl=60.0)
    db = make_db(tmp_path, auth, users=("alice", "bob"))
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    BlockingHasher.release = threading.Event()
    db.hasher = BlockingHasher(time_cost=1, memory_cost=8, parallelism=1)
    # More full checks than the verify pool has threads: all of them busy, more queued.
    slow = [asyncio.ensure_future(db.authenticate("bob", f"guess{i}", f"127.0.3.{i}"))
            for i in range(VERIFY_WORKERS + 2)]
    try:
        result = await asyncio.wait_for(db.authenticate("alice", "pw-alice", "127.0.0.2"), 20)
        assert result.ok
        assert not any(t.done() for t in slow)
    finally:
        BlockingHasher.release.set()
        results = await asyncio.gather(*slow)
    assert not any(r.ok for r in results)
    db.close()


async def test_entries_expire_after_the_ttl(tmp_path: Path) -> None:
    clock = Clock()
    db = make_db(tmp_path, cache=CredentialCache(30.0, 100, clock=clock))
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    clock.now += 29.0
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    assert CountingHasher.checks == 1
    clock.now += 1.5  # 30.5 s after the check: a hit does not extend the entry
    assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    assert CountingHasher.checks == 2
    db.close()


async def test_the_size_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    db = make_db(tmp_path, cache=CredentialCache(60.0, 2), users=("a1", "a2", "a3"))
    for user in ("a1", "a2"):
        assert (await db.authenticate(user, f"pw-{user}", "127.0.0.2")).ok
    assert (await db.authenticate("a1", "pw-a1", "127.0.0.2")).ok  # a1 is now the newest
    assert (await db.authenticate("a3", "pw-a3", "127.0.0.2")).ok  # drops a2
    assert db.cache is not None and len(db.cache) == 2
    assert CountingHasher.checks == 3
    assert (await db.authenticate("a1", "pw-a1", "127.0.0.2")).ok
    assert CountingHasher.checks == 3
    assert (await db.authenticate("a2", "pw-a2", "127.0.0.2")).ok
    assert CountingHasher.checks == 4
    db.close()


def test_the_cache_holds_neither_password_nor_plain_hash() -> None:
    one, two = CredentialCache(60.0, 10), CredentialCache(60.0, 10)
    for cache in (one, two):
        cache.store("alice", "$argon2id$stored", "pw-alice")
    (key,) = one._entries
    (other,) = two._entries
    assert len(key) == 32 and key != other  # a key of its own per cache (process)
    for plain in (b"pw-alice", hashlib.sha256(b"pw-alice").digest(),
                  hashlib.blake2b(b"pw-alice", digest_size=32).digest()):
        assert plain not in key
    assert one.lookup("alice", "$argon2id$stored", "pw-alice")
    assert not one.lookup("alice", "$argon2id$other", "pw-alice")
    assert not one.lookup("alicE", "$argon2id$stored", "pw-alice")
    # Length prefixes: moving a character across the boundary is another triple.
    assert not one.lookup("alice", "$argon2id$store", "dpw-alice")
    assert not one.lookup("alice", "$argon2id$stored", "\udc80")  # unencodable: a miss


def test_bad_limits_are_refused() -> None:
    for ttl, size in ((0.0, 10), (-1.0, 10), (86_401.0, 10), (60.0, 0), (60.0, 1_000_001)):
        with pytest.raises(ValueError):
            CredentialCache(ttl, size)


@pytest.mark.parametrize("text, line, fragment", [
    ("[auth]\ncache_ttl = -5\n", 2, "auth.cache_ttl: must be at least 0"),
    ("[auth]\nthrottle_failures = 5\ncache_ttl = 90000\n", 3,
     "auth.cache_ttl: must be at most 86400"),
    ("[auth]\ncache_ttl = 'soon'\n", 2, "auth.cache_ttl: expected a number"),
    ("[auth]\ncache_size = 0\n", 2, "auth.cache_size: must be at least 1"),
    ("auth.cache_size = 2000000\n", 1, "auth.cache_size: must be at most 1000000"),
])
def test_config_errors_name_file_line_and_value(tmp_path: Path, text: str, line: int,
                                                fragment: str) -> None:
    toml = tmp_path / "relaygate.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={}, config_file=toml)
    message = str(exc.value)
    assert fragment in message
    assert f"{toml}:{line}: " in message
    assert exc.value.value is not None


def test_config_turns_the_cache_on(tmp_path: Path) -> None:
    toml = tmp_path / "relaygate.toml"
    toml.write_text("[auth]\ncache_ttl = 120\ncache_size = 500\n")
    settings = load_settings(environ={}, config_file=toml)
    assert (settings.auth.cache_ttl, settings.auth.cache_size) == (120.0, 500)
    assert load_settings(environ={}).auth.cache_ttl == 0.0
    data = tmp_path / "data"
    db = UserDB(data / "users.db", settings.auth, data, default_domain="example.test")
    assert db.cache is not None and (db.cache.ttl, db.cache.size) == (120.0, 500)
    db.close()


async def test_metrics_count_hits_and_misses(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    metrics = Metrics()
    metrics.watch_auth_cache(db.cache_stats)
    for _ in range(3):
        assert (await db.authenticate("alice", "pw-alice", "127.0.0.2")).ok
    text = generate_latest(metrics.registry).decode()
    assert 'relaygate_auth_cache_lookups_total{result="hit"} 2.0' in text
    assert 'relaygate_auth_cache_lookups_total{result="miss"} 1.0' in text
    assert "relaygate_auth_cache_entries 1.0" in text
    off = Metrics()
    off.watch_auth_cache(lambda: None)
    assert "auth_cache" not in generate_latest(off.registry).decode()
    db.close()
