"""UserDB: accounts, lookups, argon2id logins, rehash of imported hashes, APOP, throttling."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from relaygate.config import AuthSettings
from relaygate.interfaces import Directory
from relaygate.mail.accounts.db import (
    NoSuchUser,
    UserDB,
    UserDBError,
    UserError,
    hash_scheme,
    normalize_imported_hash,
    open_directory,
    production_hasher,
)
from relaygate.mail.accounts.throttle import Throttle

#: argon2id with tiny parameters: the tests check behaviour, not cost
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
FAST_AUTH = AuthSettings(failure_delay=0.0, throttle_failures=3, throttle_window=60.0,
                         throttle_lockout=120.0)


def make_db(tmp_path: Path, auth: AuthSettings = FAST_AUTH, **kw: object) -> UserDB:
    data = tmp_path / "data"
    return UserDB(data / "users.db", auth, data, hasher=CHEAP, default_domain="example.test",
                  **kw)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> UserDB:
    d = make_db(tmp_path)
    yield d
    d.close()


def test_add_creates_account_and_private_maildir(db: UserDB, tmp_path: Path) -> None:
    a = db.add("Alice", "pw-alice", addresses=["Al@Example.TEST", "alice@other.test"])
    assert a.login == "alice"
    assert a.domain == "example.test"
    assert a.addresses == ("alice@example.test", "al@example.test", "alice@other.test")
    assert a.maildir == (tmp_path / "data" / "mail" / "example.test" / "alice").absolute()
    for sub in ("new", "cur", "tmp"):
        assert (a.maildir / sub).is_dir()
    for p in (a.maildir, a.maildir.parent, a.maildir.parent.parent):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    assert stat.S_IMODE(db.path.stat().st_mode) == 0o600
    assert a.enabled


def test_login_with_address_keeps_its_domain(db: UserDB) -> None:
    a = db.add("bob@Other.Test", "pw")
    assert (a.login, a.domain, a.primary_address) == ("bob@other.test", "other.test",
                                                       "bob@other.test")
    assert a.maildir.parts[-2:] == ("other.test", "bob")


@pytest.mark.parametrize("login", ["", "../x", "a/b", "a b", "a:b", ".hidden", "x..y",
                                   "é", "a@", "a@-bad-.test", "a" * 300])
def test_bad_login_names_are_refused(db: UserDB, login: str) -> None:
    with pytest.raises(UserError):
        db.add(login, "pw")


def test_duplicates_are_refused(db: UserDB) -> None:
    db.add("alice", "pw", addresses=["shared@example.test"])
    with pytest.raises(UserError, match="exists"):
        db.add("ALICE", "pw")
    with pytest.raises(UserError, match="belongs to alice"):
        db.add("carol", "pw", addresses=["Shared@example.test"])
    # alice's primary address is taken: a login of that spelling is refused too
    with pytest.raises(UserError):
        db.add("alice@example.test", "pw")


def test_find_recipient_and_find_account(db: UserDB) -> None:
    db.add("alice", "pw", addresses=["al@example.test"])
    assert db.find_recipient("ALICE@example.test").login == "alice"  # type: ignore[union-attr]
    assert db.find_recipient("al@EXAMPLE.test").login == "alice"  # type: ignore[union-attr]
    assert db.find_recipient("nobody@example.test") is None
    assert db.find_recipient("alice") is None  # a login is not an address
    assert db.find_account("Alice").login == "alice"  # type: ignore[union-attr]
    assert db.find_account("alice@example.test").login == "alice"  # type: ignore[union-attr]
    assert db.find_account("al@example.test") is None  # aliases do not log in
    assert db.find_account("nobody") is None


def test_userdb_satisfies_the_directory_protocol(db: UserDB) -> None:
    d: Directory = db
    assert d.find_recipient("x@y") is None


async def test_authenticate_ok_wrong_unknown_disabled(db: UserDB) -> None:
    db.add("alice", "correct horse")
    ok = await db.authenticate("alice", "correct horse", "127.0.0.2")
    assert ok.ok and ok.account is not None and ok.account.login == "alice"
    ok2 = await db.authenticate("ALICE@example.test", "correct horse", "127.0.0.2")
    assert ok2.ok
    bad = await db.authenticate("alice", "wrong", "127.0.0.2")
    assert not bad.ok and bad.account is None and not bad.throttled
    unknown = await db.authenticate("nobody", "correct horse", "127.0.0.3")
    assert not unknown.ok and not unknown.throttled
    db.set_enabled("alice", False)
    disabled = await db.authenticate("alice", "correct horse", "127.0.0.4")
    assert not disabled.ok
    db.set_enabled("alice", True)
    assert (await db.authenticate("alice", "correct horse", "127.0.0.4")).ok


async def test_failures_are_logged(db: UserDB, caplog: pytest.LogCaptureFixture) -> None:
    db.add("alice", "pw")
    with caplog.at_level(logging.INFO, logger="relaygate.events"):
        await db.authenticate("alice", "nope", "127.0.0.9", service="pop3")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("login.failed") and "user=alice" in line and "ip=127.0.0.9"
               in line and "service=pop3" in line for line in lines)
    assert not any("nope" in line for line in lines)  # never the password


async def test_throttle_per_address_and_per_account(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    db.add("alice", "pw-a")
    db.add("bob", "pw-b")
    for _ in range(3):
        assert not (await db.authenticate("alice", "guess", "127.0.0.2")).ok
    # The address is locked: even bob's right password fails from there ...
    r = await db.authenticate("bob", "pw-b", "127.0.0.2")
    assert r.throttled and r.account is None and not r.ok
    # ... and alice's account is locked from anywhere, right password or not.
    r = await db.authenticate("alice", "pw-a", "127.0.0.3")
    assert r.throttled and not r.ok
    # Others are unaffected.
    assert (await db.authenticate("bob", "pw-b", "127.0.0.3")).ok
    db.close()


async def test_throttle_account_lockout_covers_every_spelling(tmp_path: Path) -> None:
    # "bob" logs in as "bob" or as his primary address "bob@example.test": a
    # lockout earned under one spelling must hold for the other, or a guesser
    # simply switches names once the account is locked.
    db = make_db(tmp_path)
    db.add("bob", "pw-b")
    for i in range(3):
        assert not (await db.authenticate("bob", "guess", f"127.0.1.{i}")).ok
    for name in ("bob", "BOB@Example.TEST", "bob@example.test"):
        r = await db.authenticate(name, "pw-b", "127.0.2.1")
        assert r.throttled and not r.ok, name
    db.close()
    # ... and the other way round, APOP included.
    db = make_db(tmp_path / "b")
    db.add("carol", "pw-c", apop=True)
    for i in range(3):
        assert not (await db.authenticate("carol@example.test", "guess", f"127.0.3.{i}")).ok
    assert (await db.authenticate("carol", "pw-c", "127.0.4.1")).throttled
    assert (await db.authenticate_apop("carol", "<1.2@h>", "0" * 32, "127.0.4.2")).throttled
    db.close()


async def test_throttle_unknown_users_count_per_address(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    db.add("alice", "pw-a")
    for i in range(3):
        await db.authenticate(f"ghost{i}", "x", "127.0.0.5")
    assert (await db.authenticate("alice", "pw-a", "127.0.0.5")).throttled
    db.close()


class CountingHasher(PasswordHasher):
    """Counts full password checks; each takes a little while, so attempts overlap."""

    checks = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        type(self).checks += 1
        time.sleep(0.01)
        return bool(super().verify(hash, password))


def counting_db(tmp_path: Path, failures: int = 5) -> UserDB:
    CountingHasher.checks = 0
    data = tmp_path / "data"
    auth = AuthSettings(failure_delay=0.05, throttle_failures=failures, throttle_window=60.0,
                        throttle_lockout=120.0)
    db = UserDB(data / "users.db", auth, data,
                hasher=CountingHasher(time_cost=1, memory_cost=8, parallelism=1),
                default_domain="example.test")
    db.add("alice", "pw-a")
    db.add("bob", "pw-b")
    CountingHasher.checks = 0
    return db


async def test_concurrent_guesses_from_one_address_are_counted_in_flight(tmp_path: Path) -> None:
    # 20 simultaneous guesses from one address, the right password last: only
    # the budget (5) gets a password check, the right one is refused unchecked,
    # and bob, from another address, logs in meanwhile.
    db = counting_db(tmp_path)
    guesses = [db.authenticate("alice", f"guess{i}", "127.0.5.1") for i in range(19)]
    guesses.append(db.authenticate("alice", "pw-a", "127.0.5.1"))
    *results, bob = await asyncio.gather(*guesses, db.authenticate("bob", "pw-b", "127.0.5.2"))
    assert not any(r.ok for r in results)
    assert results[-1].throttled
    assert sum(not r.throttled for r in results) == 5
    assert CountingHasher.checks == 5 + 1  # five guesses and bob
    assert bob.ok
    assert db.throttle.in_flight("127.0.5.1", "alice") == (0, 0)
    # Afterwards both the address and the account are locked.
    assert (await db.authenticate("alice", "pw-a", "127.0.5.3")).throttled
    assert (await db.authenticate("bob", "pw-b", "127.0.5.1")).throttled
    db.close()


async def test_concurrent_guesses_from_many_addresses_hit_the_account_budget(
        tmp_path: Path) -> None:
    # 60 attempts from 60 addresses against one account, the right password
    # last: the account budget stops them; bob (another account) gets in meanwhile.
    db = counting_db(tmp_path)
    guesses = [db.authenticate("alice", f"guess{i}", f"127.0.6.{i}") for i in range(59)]
    guesses.append(db.authenticate("alice@example.test", "pw-a", "127.0.6.59"))
    *results, bob = await asyncio.gather(*guesses, db.authenticate("bob", "pw-b", "127.0.6.1"))
    assert not any(r.ok for r in results)
    assert results[-1].throttled
    assert CountingHasher.checks == 5 + 1
    assert bob.ok
    assert (await db.authenticate("alice", "pw-a", "127.0.7.1")).throttled
    db.close()


async def test_address_budget_alone_spares_other_addresses(tmp_path: Path) -> None:
    # One address guesses at many (unknown) accounts: only the address runs out,
    # so alice from elsewhere logs in while the guesses are still in flight.
    db = counting_db(tmp_path)
    guesses = [db.authenticate(f"ghost{i}", "x", "127.0.8.1") for i in range(20)]
    *results, alice, blocked = await asyncio.gather(
        *guesses, db.authenticate("alice", "pw-a", "127.0.8.2"),
        db.authenticate("alice", "pw-a", "127.0.8.1"))
    assert sum(not r.throttled for r in results) == 5
    assert alice.ok
    assert blocked.throttled and not blocked.ok
    db.close()


async def test_apop_attempts_are_counted_in_flight(tmp_path: Path) -> None:
    db = counting_db(tmp_path)
    db.add("carol", "pw-c", apop=True)
    secret = db.apop_secret("carol")
    assert secret is not None
    good = hashlib.md5(("<1.2@h>" + secret).encode(), usedforsecurity=False).hexdigest()
    attempts = [db.authenticate("carol", f"guess{i}", "127.0.9.1") for i in range(4)]
    attempts += [db.authenticate_apop("carol", "<1.2@h>", "0" * 32, "127.0.9.2"),
                 db.authenticate_apop("carol", "<1.2@h>", good, "127.0.9.3")]
    results = await asyncio.gather(*attempts)
    assert [r.throttled for r in results] == [False] * 5 + [True]
    assert not any(r.ok for r in results)
    db.close()


async def test_success_and_database_errors_leave_no_reservation(tmp_path: Path) -> None:
    db = counting_db(tmp_path, failures=2)
    for _ in range(5):
        assert (await db.authenticate("alice", "pw-a", "127.0.10.1")).ok
    assert db.throttle.in_flight("127.0.10.1", "alice") == (0, 0)
    # One failure, then successes: the budget of two is not eaten by phantoms.
    assert not (await db.authenticate("alice", "bad", "127.0.10.1")).ok
    assert (await db.authenticate("alice", "pw-a", "127.0.10.1")).ok
    assert (await db.authenticate("alice", "pw-a", "127.0.10.1")).ok
    db._db.close()  # the database goes away: not a failure of the guesser
    with pytest.raises(UserDBError):
        await db.authenticate("bob", "pw-b", "127.0.10.2")
    assert db.throttle.in_flight("127.0.10.2", "bob") == (0, 0)


async def test_cancelled_attempt_counts_as_a_failure(tmp_path: Path) -> None:
    db = counting_db(tmp_path, failures=2)
    task = asyncio.create_task(db.authenticate("alice", "guess", "127.0.11.1"))
    await asyncio.sleep(0)  # started: reserved, hash running
    assert db.throttle.in_flight("127.0.11.1", "alice") == (1, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.throttle.in_flight("127.0.11.1", "alice") == (0, 0)
    assert not (await db.authenticate("alice", "guess", "127.0.11.1")).throttled
    assert (await db.authenticate("alice", "pw-a", "127.0.11.1")).throttled
    db.close()


def test_throttle_begin_counts_in_flight_attempts() -> None:
    t = Throttle(3, window=60, lockout=100)
    a = [t.begin("1.2.3.4", "alice", now=0) for _ in range(3)]
    assert all(x is not None for x in a)
    assert t.begin("1.2.3.4", "alice", now=0) is None  # both budgets spent
    assert t.begin("1.2.3.4", "bob", now=0) is None  # the address is spent
    assert t.begin("5.6.7.8", "alice", now=0) is None  # the account is spent
    other = t.begin("5.6.7.8", "bob", now=0)
    assert other is not None
    other.succeeded()
    # They finish in any order; failures lock, successes release.
    assert a[2] is not None and a[0] is not None and a[1] is not None
    a[2].succeeded()
    assert not a[0].failed(now=1)
    assert t.begin("9.9.9.9", "alice", now=1) is not None  # one place free again
    assert not a[1].failed(now=2)
    a[1].failed(now=2)  # ending twice does nothing
    assert t.in_flight("1.2.3.4", "alice") == (0, 1)


async def test_ipv6_neighbours_share_one_budget(tmp_path: Path) -> None:
    # Two addresses of one /64 are one client for the throttle; the next /64 is not.
    db = make_db(tmp_path)
    db.add("alice", "pw-a")
    db.add("bob", "pw-b")
    for i in range(3):
        await db.authenticate(f"ghost{i}", "x", f"2001:db8:1:2::{i + 1}")
    assert (await db.authenticate("alice", "pw-a", "2001:db8:1:2:ffff::9")).throttled
    assert (await db.authenticate("alice", "pw-a", "2001:db8:1:3::1")).ok
    db.close()


async def test_ipv6_prefix_is_configurable(tmp_path: Path) -> None:
    db = make_db(tmp_path, ipv6_prefix=128)
    db.add("alice", "pw-a")
    for i in range(3):
        await db.authenticate(f"ghost{i}", "x", "2001:db8:1:2::1")
    assert (await db.authenticate("alice", "pw-a", "2001:db8:1:2::2")).ok
    db.close()


def test_throttle_groups_ipv6_keys() -> None:
    t = Throttle(2, window=60, lockout=100, ipv6_prefix=48)
    t.record_failure("2001:db8:1:2::1", "a", now=0)
    t.record_failure("2001:db8:1:ffff::1", "b", now=0)
    assert t.locked("2001:db8:1::7", "c", now=1)
    assert not t.locked("2001:db8:2::7", "c", now=1)
    assert not t.locked("192.0.2.1", "c", now=1)
    with pytest.raises(ValueError):
        Throttle(2, window=60, lockout=100, ipv6_prefix=16)


def test_throttle_lockout_expires_and_does_not_extend() -> None:
    t = Throttle(3, window=60, lockout=100)
    for s in (0, 1, 2):
        t.record_failure("1.2.3.4", "alice", now=s)
    assert t.locked("1.2.3.4", "bob", now=50)
    assert t.locked("9.9.9.9", "alice", now=101)
    assert not t.locked("1.2.3.4", "alice", now=102.1)


def test_throttle_window_slides() -> None:
    t = Throttle(3, window=10, lockout=100)
    t.record_failure("a", "u", now=0)
    t.record_failure("a", "u", now=5)
    t.record_failure("a", "u", now=11)  # the first has aged out
    assert not t.locked("a", "u", now=11)
    t.record_failure("a", "u", now=12)
    assert t.locked("a", "u", now=12)


def test_throttle_table_is_bounded() -> None:
    t = Throttle(5, window=60, lockout=60, max_keys=100)
    for i in range(1000):
        t.record_failure(f"10.0.{i // 256}.{i % 256}", "alice", now=1.0)
    assert len(t) <= 100


async def test_failure_delay_is_constant_and_does_not_block_the_loop(tmp_path: Path) -> None:
    auth = AuthSettings(failure_delay=0.3, throttle_failures=100)
    db = make_db(tmp_path, auth)
    db.add("alice", "pw")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.gather(db.authenticate("alice", "bad", "127.0.0.2"),
                                   db.authenticate("ghost", "bad", "127.0.0.3"))
    elapsed = loop.time() - t0
    task.cancel()
    assert not any(r.ok for r in results)
    assert elapsed >= 0.3  # the answer waited for the failure delay
    assert ticks >= 5  # and the loop ran meanwhile
    db.close()


class SpyHasher(PasswordHasher):
    """Records every hash it verifies against."""

    verified: list[str]

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        type(self).verified.append(str(hash))
        return bool(super().verify(hash, password))


async def test_unknown_users_pay_a_hash(tmp_path: Path) -> None:
    SpyHasher.verified = []
    data = tmp_path / "data"
    db = UserDB(data / "users.db", FAST_AUTH, data,
                hasher=SpyHasher(time_cost=1, memory_cost=8, parallelism=1),
                default_domain="example.test")
    db.add("alice", "pw")
    await db.authenticate("ghost", "pw", "127.0.0.2")
    await db.authenticate("alice", "wrong", "127.0.0.2")
    assert len(SpyHasher.verified) == 2
    assert all(h.startswith("$argon2id$v=19$m=8,t=1,p=1$") for h in SpyHasher.verified)
    db.close()


async def test_imported_hashes_verify_and_are_rehashed(db: UserDB) -> None:
    from passlib.hash import bcrypt, sha256_crypt, sha512_crypt

    # Low cost factors: the rounds are part of the hash, verification is the same code.
    sha512_crypt = sha512_crypt.using(rounds=1000)
    sha256_crypt = sha256_crypt.using(rounds=1000)
    bcrypt = bcrypt.using(rounds=4)
    lines = [
        "# comment",
        "",
        f"carol:{sha512_crypt.hash('c-pw')}:1000:1000::/home/carol:/bin/sh",
        f"dave@other.test:{sha256_crypt.hash('d-pw')}",
        f"erin:{{BLF-CRYPT}}{bcrypt.hash('e-pw')}",
        f"frank:{CHEAP.hash('f-pw').replace('argon2id', 'argon2id')}",
    ]
    result = db.import_passwd(lines)
    assert (result.added, result.updated) == (4, 0)
    assert db.hash_scheme_of("carol") == "sha512_crypt"
    assert db.hash_scheme_of("dave@other.test") == "sha256_crypt"
    assert db.hash_scheme_of("erin") == "bcrypt"
    assert not (await db.authenticate("carol", "wrong", "127.0.0.2")).ok
    assert db.hash_scheme_of("carol") == "sha512_crypt"  # a failure changes nothing
    for login, pw in (("carol", "c-pw"), ("dave@other.test", "d-pw"), ("erin", "e-pw"),
                      ("frank", "f-pw")):
        assert (await db.authenticate(login, pw, "127.0.0.3")).ok, login
        assert db.hash_scheme_of(login) == "argon2id"
        assert (await db.authenticate(login, pw, "127.0.0.3")).ok, login
    assert (db.data_dir / "mail" / "example.test" / "carol" / "new").is_dir()


async def test_argon2_with_old_parameters_is_rehashed(db: UserDB) -> None:
    old = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1).hash("pw")
    db.import_passwd([f"gina:{old}"])
    assert (await db.authenticate("gina", "pw", "127.0.0.2")).ok
    row = db._query(lambda c: c.execute("SELECT password FROM users WHERE login='gina'")
                    .fetchone())
    assert row[0].startswith("$argon2id$v=19$m=8,t=1,p=1$")


def test_import_is_all_or_nothing(db: UserDB) -> None:
    from passlib.hash import sha512_crypt

    good = f"hank:{sha512_crypt.using(rounds=1000).hash('x')}"
    with pytest.raises(UserError) as err:
        db.import_passwd([good, "ivy:$9$unknown", "no-colon-here", "jo:*", "k/x:$6$x$y"])
    text = str(err.value)
    assert "line 2" in text and "line 3" in text and "line 4" in text and "line 5" in text
    assert db.find_account("hank") is None
    db.import_passwd([good])
    with pytest.raises(UserError, match="exists"):
        db.import_passwd([good])
    assert db.import_passwd([good], update=True).updated == 1


@pytest.mark.parametrize("raw,scheme", [
    ("$6$rounds=5000$salt$" + "a" * 86, "sha512_crypt"),
    ("{SHA512-CRYPT}$6$salt$" + "a" * 86, "sha512_crypt"),
])
def test_normalize_imported_hash(raw: str, scheme: str) -> None:
    assert hash_scheme(normalize_imported_hash(raw)) == scheme


def test_production_hasher_is_rfc9106_low_memory() -> None:
    h = production_hasher()
    assert (h.memory_cost, h.time_cost, h.parallelism) == (65536, 3, 4)


async def test_apop(db: UserDB) -> None:
    db.add("alice", "pw", apop=True)
    db.add("bob", "pw")
    secret = db.apop_secret("alice")
    assert secret and secret != "pw"
    assert db.apop_secret("bob") is None
    stamp = "<1896.697170952@dbc.mtview.ca.us>"
    digest = hashlib.md5((stamp + secret).encode()).hexdigest()
    assert (await db.authenticate_apop("alice", stamp, digest, "127.0.0.2")).ok
    assert (await db.authenticate_apop("alice", stamp, digest.upper(), "127.0.0.2")).ok
    assert not (await db.authenticate_apop("alice", stamp, "0" * 32, "127.0.0.2")).ok
    assert not (await db.authenticate_apop("bob", stamp, digest, "127.0.0.2")).ok
    new = db.set_apop("alice", True)
    assert new != secret
    assert not (await db.authenticate_apop("alice", stamp, digest, "127.0.0.3")).ok
    assert db.set_apop("alice", False) is None
    assert db.apop_secret("alice") is None


def test_rfc1939_apop_example_digest() -> None:
    # RFC 1939 section 7's worked example, to pin the digest construction.
    stamp = "<1896.697170952@dbc.mtview.ca.us>"
    assert hashlib.md5((stamp + "tanstaaf").encode()).hexdigest() == \
        "c4c9334bac560ecc979e58001b3e22fb"


def test_changes_by_another_process_are_seen(db: UserDB, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import relaygate.mail.accounts.db as users

    monkeypatch.setattr(users, "RELOAD_CHECK_INTERVAL", 0.0)
    other = make_db(tmp_path)  # a second connection, as the CLI would have
    assert db.find_recipient("zed@example.test") is None
    other.add("zed", "pw")
    db._next_check = 0.0
    assert db.find_recipient("zed@example.test") is not None
    other.delete("zed")
    db._next_check = 0.0
    assert db.find_recipient("zed@example.test") is None
    other.close()


def test_reload_picks_up_changes(db: UserDB, tmp_path: Path) -> None:
    other = make_db(tmp_path)
    other.add("yan", "pw")
    db.reload()
    assert db.find_account("yan") is not None
    other.close()


def test_admin_operations(db: UserDB) -> None:
    db.add("alice", "one")
    with pytest.raises(NoSuchUser):
        db.set_password("nobody", "x")
    with pytest.raises(UserError):
        db.set_password("alice", "")
    a = db.set_addresses("alice", ["x@example.test", "alice@example.test"])
    assert a.addresses == ("alice@example.test", "x@example.test")
    removed = db.delete("alice")
    assert removed.maildir.is_dir()  # mail is kept
    assert db.find_account("alice") is None
    assert db.find_recipient("x@example.test") is None
    assert db.list() == []


async def test_set_password(db: UserDB) -> None:
    db.add("alice", "one")
    db.set_password("alice", "two")
    assert not (await db.authenticate("alice", "one", "127.0.0.2")).ok
    assert (await db.authenticate("alice", "two", "127.0.0.2")).ok


def test_open_directory_uses_settings(tmp_path: Path) -> None:
    from relaygate.config import Settings

    s = Settings(data_dir=tmp_path / "d", domains=("mail.test",))
    d = open_directory(s, hasher=CHEAP)
    a = d.add("alice", "pw")
    assert d.path == tmp_path / "d" / "users.db"
    assert a.maildir == (tmp_path / "d" / "mail" / "mail.test" / "alice").absolute()
    d.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "users.db"
    c = sqlite3.connect(p)
    c.execute("PRAGMA user_version = 99")
    c.close()
    with pytest.raises(UserDBError, match="newer"):
        UserDB(p, FAST_AUTH, tmp_path, hasher=CHEAP)


async def test_database_failure_raises_userdb_error(db: UserDB) -> None:
    db.add("alice", "pw")
    db._db.close()  # simulate a broken database
    with pytest.raises(UserDBError):
        await db.authenticate("alice", "pw", "127.0.0.2")
    # lookups keep answering from the cached copy
    db._next_check = 0.0
    assert db.find_recipient("alice@example.test") is not None


def test_long_password_fails_without_hashing(db: UserDB) -> None:
    db.add("alice", "pw")
    t0 = time.monotonic()
    account, why = db._verify_sync("alice", "x" * 100_000)
    assert account is None and why == "password too long"
    assert time.monotonic() - t0 < 5


def test_data_dir_permissions(tmp_path: Path) -> None:
    d = make_db(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o700
    d.close()
