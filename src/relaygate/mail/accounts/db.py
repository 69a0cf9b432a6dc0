"""The user database: accounts, argon2id passwords, APOP secrets, login throttling.

Theory of operation
-------------------
Accounts live in SQLite, ``<data_dir>/users.db`` (mode 0600: it holds password
hashes and APOP secrets). Schema (``PRAGMA user_version = 1``)::

    users(login TEXT PRIMARY KEY,      -- lower case: "alice" or "alice@example.test"
          domain TEXT NOT NULL,        -- lower case
          maildir TEXT NOT NULL,       -- absolute path
          password TEXT NOT NULL,      -- PHC/crypt(3) string: $argon2id$..., or an
                                       -- imported $6$/$5$/$2b$/$1$ hash until next login
          apop_secret TEXT,            -- NULL unless APOP is enabled for this user
          enabled INTEGER NOT NULL,    -- 0: cannot log in (mail is still accepted)
          created_at REAL, changed_at REAL)
    addresses(address TEXT PRIMARY KEY,  -- lower case, unique across all users
              login TEXT REFERENCES users ON DELETE CASCADE,
              position INTEGER)          -- 0 = the primary address

The primary address is the login when it contains ``@``, else
``login@domain``. Recipient lookups (:meth:`UserDB.find_recipient`, called for
every RCPT) are answered from an in-memory copy of both tables; the copy is
reloaded when another process commits (``PRAGMA data_version``, looked at most
once per :data:`RELOAD_CHECK_INTERVAL`), after our own writes, and on
:meth:`UserDB.reload` (``SIGHUP``).

Passwords are hashed with argon2id (argon2-cffi, RFC 9106 "low memory"
profile: 64 MiB, t=3, p=4). Verification runs on a small dedicated thread pool
(:data:`VERIFY_WORKERS` threads, so at most that many 64 MiB checks run at once
and the asyncio loop never waits on one). Hashes imported from a passwd-style
file (crypt(3) ``$6$``, ``$5$``, ``$2a$/$2b$/$2y$``, ``$1$``, or argon2) are
verified with libpass and replaced by an argon2id hash at the next successful
login, as are argon2 hashes with parameters other than the current ones.

Login rules (:meth:`UserDB.authenticate`): see :mod:`relaygate.mail.accounts.throttle`
for the per-address and per-account lockout. Each attempt reserves its place
in both budgets before its password is checked, so concurrent guesses count
while still in flight; a throttled or over-budget attempt is refused without
checking the password. An unknown login is checked against a dummy
hash with the same parameters, so it costs what a known one costs, and every
failure is answered ``AuthSettings.failure_delay`` seconds after the attempt
began (or when the hash check ends, if that is later): the answer time says
nothing about whether the login exists. Failures are logged as
``login.failed`` / ``login.throttled`` events; the servers log ``login.ok``.

With ``auth.cache_ttl`` set, a login whose account, stored hash and password
were verified within that time skips the argon2id check (and nothing else):
see :mod:`relaygate.mail.accounts.cache`.

APOP (RFC 1939 section 7) needs the shared secret in clear text, so it is
opt-in per user and uses its own random secret, never the password.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from relaygate.addresses import DEFAULT_IPV6_PREFIX
from relaygate.errors import RelaygateError
from relaygate.interfaces import Account, LoginResult
from relaygate.log import event
from relaygate.mail.accounts.cache import CredentialCache
from relaygate.mail.accounts.errors import NoSuchUser, UserDBError, UserError
from relaygate.mail.accounts.hashes import (
    crypt_handler,
    hash_scheme,
    hasher_description,
    normalize_imported_hash,
    production_hasher,
    verify_argon2,
)
from relaygate.mail.accounts.throttle import Attempt, Throttle
from relaygate.mail.maildir import ensure_maildir

if TYPE_CHECKING:
    from relaygate.config import AuthSettings, Settings

log = logging.getLogger("relaygate.users")

T = TypeVar("T")

SCHEMA_VERSION = 1
#: how often (seconds) lookups ask SQLite whether another process changed the
#: users; a CLI change reaches a running server within this time
RELOAD_CHECK_INTERVAL = 1.0
#: concurrent password checks; each argon2id check holds 64 MiB
VERIFY_WORKERS = max(2, min(4, os.cpu_count() or 2))
#: longest login or address accepted (RFC 5321 path limit)
MAX_NAME_LENGTH = 254
#: longest password looked at; longer ones fail without hashing (no hash-DoS)
MAX_PASSWORD_LENGTH = 1024
#: SQLite busy timeout (seconds): the CLI may hold the write lock briefly
BUSY_TIMEOUT = 5.0

_LOCAL_RE = re.compile(r"[a-z0-9](?:[a-z0-9._+=-]{0,63})")
_DOMAIN_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62})(?:\.[a-z0-9](?:[a-z0-9-]{0,62}))*")
#: what an address may hold: no spaces, controls, brackets or quotes
_ADDR_LOCAL_RE = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    login       TEXT PRIMARY KEY,
    domain      TEXT NOT NULL,
    maildir     TEXT NOT NULL,
    password    TEXT NOT NULL,
    apop_secret TEXT,
    enabled     INTEGER NOT NULL DEFAULT 1,
    created_at  REAL NOT NULL,
    changed_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS addresses (
    address  TEXT PRIMARY KEY,
    login    TEXT NOT NULL REFERENCES users(login) ON DELETE CASCADE ON UPDATE CASCADE,
    position INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS addresses_login ON addresses(login);
"""


@dataclass(frozen=True)
class _NewUser:
    login: str
    domain: str
    maildir: Path
    stored: str
    apop_secret: str | None
    enabled: bool
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class ImportResult:
    added: int
    updated: int


class UserDB:
    """SQLite-backed :class:`relaygate.mail.directory.Directory` with argon2id and throttling."""

    def __init__(
        self,
        path: Path,
        auth: AuthSettings,
        data_dir: Path,
        *,
        hasher: PasswordHasher | None = None,
        default_domain: str | None = None,
        throttle: Throttle | None = None,
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
        cache: CredentialCache | None = None,
    ) -> None:
        self.path = Path(path)
        self.auth = auth
        self.data_dir = Path(data_dir).absolute()
        self.hasher = hasher or production_hasher()
        self.default_domain = default_domain.lower().rstrip(".") if default_domain else None
        self.throttle = throttle or Throttle(
            auth.throttle_failures, auth.throttle_window, auth.throttle_lockout,
            ipv6_prefix=ipv6_prefix)
        #: recently verified passwords (``auth.cache_ttl``; None: off), see
        #: :mod:`relaygate.mail.accounts.cache`
        self.cache = cache
        if cache is None and auth.cache_ttl > 0:
            self.cache = CredentialCache(auth.cache_ttl, auth.cache_size)
        self._lock = threading.RLock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._dummy_hash: str | None = None
        self._by_login: dict[str, Account] = {}
        self._by_address: dict[str, Account] = {}
        self._apop: dict[str, str] = {}
        self._data_version = -1
        self._next_check = 0.0
        self._db = self._connect()
        self._load()

    # -- storage ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file 0600 ourselves: SQLite would use the umask, and the
            # -wal/-shm files inherit the database's mode.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                 check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise UserDBError(f"cannot open user database {self.path}: {exc}") from None
        try:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA journal_mode = WAL")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise UserDBError(f"{self.path}: schema version {version} is newer than this "
                                  f"relaygate understands ({SCHEMA_VERSION})")
            if version < SCHEMA_VERSION:
                db.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        except sqlite3.Error as exc:
            db.close()
            raise UserDBError(f"cannot open user database {self.path}: {exc}") from None
        return db

    def _query(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise UserDBError(f"user database {self.path}: {exc}") from None

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one IMMEDIATE transaction, then refresh the in-memory copy."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                raise UserError(_integrity_message(exc)) from None
            except sqlite3.Error as exc:
                raise UserDBError(f"user database {self.path}: {exc}") from None
            self._load()
            return out

    def _load(self) -> None:
        def read(db: sqlite3.Connection) -> tuple[int, list[Any], list[Any]]:
            db.execute("BEGIN")
            try:
                version = int(db.execute("PRAGMA data_version").fetchone()[0])
                users = db.execute(
                    "SELECT login, domain, maildir, enabled, apop_secret FROM users").fetchall()
                addrs = db.execute(
                    "SELECT login, address FROM addresses ORDER BY login, position").fetchall()
            finally:
                db.execute("COMMIT")
            return version, users, addrs

        version, users, addrs = self._query(read)
        by_addr: dict[str, list[str]] = {}
        for login, address in addrs:
            by_addr.setdefault(login, []).append(address)
        by_login: dict[str, Account] = {}
        by_address: dict[str, Account] = {}
        apop: dict[str, str] = {}
        for login, domain, maildir, enabled, apop_secret in users:
            account = Account(login, domain, Path(maildir), tuple(by_addr.get(login, ())),
                              bool(enabled))
            by_login[login] = account
            for a in account.addresses:
                by_address[a] = account
            by_address.setdefault(account.primary_address, account)
            if apop_secret:
                apop[login] = apop_secret
        with self._lock:
            self._by_login, self._by_address, self._apop = by_login, by_address, apop
            self._data_version = version
            self._next_check = time.monotonic() + RELOAD_CHECK_INTERVAL

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        # Lookups run on the event loop: never wait for the connection (a thread
        # may be in a write waiting for the CLI's lock); look again next time.
        if not self._lock.acquire(blocking=False):
            return
        try:
            version = self._query(
                lambda db: int(db.execute("PRAGMA data_version").fetchone()[0]))
            if version != self._data_version:
                self._load()
            else:
                self._next_check = now + RELOAD_CHECK_INTERVAL
        except UserDBError as exc:
            # Keep answering from the last good copy; say so once per interval.
            self._next_check = now + RELOAD_CHECK_INTERVAL
            log.warning("cannot reload users, using the cached copy: %s", exc)
        finally:
            self._lock.release()

    def reload(self) -> None:
        """Re-read every account now and empty the credential cache (``SIGHUP``)."""
        if self.cache is not None:
            self.cache.clear()
        self._load()

    def cache_stats(self) -> tuple[int, int, int] | None:
        """The credential cache's (hits, misses, entries), or None when it is off."""
        cache = self.cache
        return None if cache is None else (cache.hits, cache.misses, len(cache))

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- lookups (Directory) ------------------------------------------------

    def find_recipient(self, address: str) -> Account | None:
        """The account receiving mail for ``address`` (case-insensitive), or None.

        Disabled accounts are returned too (``enabled=False``): disabling stops
        logins, the caller decides about mail.
        """
        self._maybe_reload()
        return self._by_address.get(address.strip().lower())

    def find_account(self, login: str) -> Account | None:
        """The account whose login (or primary address) is ``login``, or None."""
        self._maybe_reload()
        key = login.strip().lower()
        account = self._by_login.get(key)
        if account is None:
            account = self._by_address.get(key)
            if account is not None and account.primary_address != key:
                return None
        return account

    def list(self) -> list[Account]:
        self._maybe_reload()
        return sorted(self._by_login.values(), key=lambda a: (a.domain, a.login))

    def apop_secret(self, login: str) -> str | None:
        """The APOP secret of an enabled account that has one, else None."""
        account = self.find_account(login)
        if account is None or not account.enabled:
            return None
        return self._apop.get(account.login)

    def hash_scheme_of(self, login: str) -> str | None:
        account = self.find_account(login)
        if account is None:
            return None
        row = self._query(lambda db: db.execute(
            "SELECT password FROM users WHERE login = ?", (account.login,)).fetchone())
        return hash_scheme(row[0]) if row else None

    # -- authentication -----------------------------------------------------

    async def authenticate(self, login: str, password: str, ip: str, *,
                           service: str | None = None) -> LoginResult:
        """Check ``password`` for ``login`` from client ``ip``, with throttling.

        Returns ``LoginResult(account)`` on success, ``LoginResult(None)`` on a
        wrong password, unknown or disabled user, and ``LoginResult(None,
        throttled=True)`` while the address or account is locked out. Failures
        return after the constant failure delay. Raises UserDBError when the
        database cannot be read (answer a temporary failure).
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        attempt = self.throttle.begin(ip, self._throttle_key(login))
        if attempt is None:
            return await self._throttled(start, login, ip, service)
        try:
            hit = None
            if self.cache is not None:
                # Off the verify pool: a hit must not queue behind argon2id checks.
                hit = await loop.run_in_executor(None, self._cached_sync, login, password)
            if hit is not None:
                account, why = hit
            else:
                account, why = await self._run(self._verify_sync, login, password)
        except UserDBError:
            attempt.abandoned()  # no check was made: the database failed, not the guess
            raise
        except BaseException:
            # Cancelled (the client went away) or a bug: count a failure, so
            # dropping the connection mid-check buys no extra guess.
            attempt.failed()
            raise
        if account is not None:
            attempt.succeeded()
            return LoginResult(account)
        return await self._failed(start, attempt, login, ip, service, why)

    async def authenticate_apop(self, login: str, timestamp: str, digest: str, ip: str, *,
                                service: str | None = "pop3") -> LoginResult:
        """RFC 1939 APOP: ``digest`` must be MD5(timestamp + secret) in lower-case hex.

        Same throttling and failure delay as :meth:`authenticate`.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        attempt = self.throttle.begin(ip, self._throttle_key(login))
        if attempt is None:
            return await self._throttled(start, login, ip, service)
        try:
            account = self.find_account(login)
            secret = self.apop_secret(login)
        except UserDBError:
            attempt.abandoned()
            raise
        why = "unknown user" if account is None else "apop not enabled"
        if account is not None and secret is not None:
            expected = hashlib.md5((timestamp + secret).encode("utf-8"),
                                   usedforsecurity=False).hexdigest()
            if hmac.compare_digest(expected.encode(), digest.lower().encode("utf-8", "replace")):
                attempt.succeeded()
                return LoginResult(account)
            why = "wrong digest"
        return await self._failed(start, attempt, login, ip, service, why)

    def _throttle_key(self, login: str) -> str:
        """The account name failures are counted under: one key per account, however
        it is typed (login or primary address), so neither spelling escapes a lockout."""
        account = self.find_account(login)
        return account.login if account is not None else login

    async def _throttled(self, start: float, login: str, ip: str,
                         service: str | None) -> LoginResult:
        event("login.throttled", level=logging.WARNING, user=_loggable(login), ip=ip,
              service=service)
        await self._delay(start)
        return LoginResult(None, throttled=True)

    async def _failed(self, start: float, attempt: Attempt, login: str, ip: str,
                      service: str | None, why: str) -> LoginResult:
        key = attempt.keys[1].removeprefix("acct:")
        tipped = attempt.failed()
        event("login.failed", level=logging.INFO, user=_loggable(login), ip=ip,
              service=service, reason=why)
        if tipped:
            event("login.throttled", level=logging.WARNING, user=_loggable(key), ip=ip,
                  service=service, reason="too many failures",
                  lockout=int(self.throttle.lockout))
        await self._delay(start)
        return LoginResult(None)

    async def _delay(self, start: float) -> None:
        remaining = self.auth.failure_delay - (asyncio.get_running_loop().time() - start)
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=VERIFY_WORKERS, thread_name_prefix="relaygate-verify")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self.hasher.hash(secrets.token_hex(16))
        return self._dummy_hash

    def _row(self, account: Account) -> tuple[str, bool] | None:
        """The stored hash and the enabled flag of ``account``, read from SQLite now."""
        row = self._query(lambda db: db.execute(
            "SELECT password, enabled FROM users WHERE login = ?",
            (account.login,)).fetchone())
        return None if row is None else (str(row[0]), bool(row[1]))

    def _cached_sync(self, login: str, password: str) -> tuple[Account | None, str] | None:
        """A credential-cache hit's answer, or None (a miss: make the full check)."""
        cache = self.cache
        account = self.find_account(login)
        if cache is None or account is None or len(password) > MAX_PASSWORD_LENGTH:
            return None
        row = self._row(account)
        if row is None or not cache.lookup(account.login, row[0], password):
            return None
        return (account, "") if row[1] else (None, "disabled")

    def _verify_sync(self, login: str, password: str) -> tuple[Account | None, str]:
        """Blocking part of a login: look up, verify, maybe rehash. Runs on the pool.

        The row is read from SQLite on every call, so a password change, a
        disable or a delete committed by another process (``relaygate users``)
        counts at once, for a credential-cache hit as for a full check.
        """
        account = self.find_account(login)
        row = self._row(account) if account is not None else None
        if len(password) > MAX_PASSWORD_LENGTH:
            return None, "password too long"
        if account is None or row is None:
            self._check(self._dummy(), password)
            return None, "unknown user"
        stored, enabled = row
        cache = self.cache
        if not self._check(stored, password):
            return None, "wrong password"
        if not enabled:
            return None, "disabled"
        if self._needs_rehash(stored):
            self._rehash(account.login, stored, password)
        elif cache is not None:
            cache.store(account.login, stored, password)
        return account, ""

    def _check(self, stored: str, password: str) -> bool:
        try:
            if stored.startswith("$argon2"):
                return verify_argon2(self.hasher, stored, password)
            scheme = hash_scheme(stored)
            if scheme == "unknown":
                verify_argon2(self.hasher, self._dummy(), password)
                return False
            return bool(crypt_handler(scheme).verify(password, stored))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        except (ValueError, TypeError, UnicodeError) as exc:
            # e.g. bcrypt refusing a password over 72 bytes, or unencodable text
            log.debug("password check failed: %s", type(exc).__name__)
            return False

    def _needs_rehash(self, stored: str) -> bool:
        if not stored.startswith("$argon2id$"):
            return True
        try:
            return bool(self.hasher.check_needs_rehash(stored))
        except InvalidHashError:
            return True

    def _rehash(self, login: str, old: str, password: str) -> None:
        new = self.hasher.hash(password)

        def update(db: sqlite3.Connection) -> None:
            # Compare-and-set: a concurrent ``users passwd`` wins.
            db.execute("UPDATE users SET password = ?, changed_at = ? "
                       "WHERE login = ? AND password = ?", (new, time.time(), login, old))

        try:
            self._write(update)
            event("login.rehashed", user=login, scheme=hash_scheme(old))
        except RelaygateError as exc:
            log.warning("could not store the new hash of %s: %s", login, exc)

    # -- administration -----------------------------------------------------

    def split_login(self, login: str, domain: str | None = None) -> tuple[str, str, str]:
        """Validate ``login``; return (login, localpart, domain), all lower case."""
        name = login.strip().lower()
        if not name or len(name) > MAX_NAME_LENGTH:
            raise UserError(f"bad login name {login!r}")
        if "@" in name:
            local, _, dom = name.partition("@")
            if domain is not None and domain.lower().rstrip(".") != dom:
                raise UserError(f"login {login!r} names domain {dom!r}, not {domain!r}")
        else:
            local = name
            dom = (domain or self.default_domain or "").lower().rstrip(".")
            if not dom:
                raise UserError(f"login {login!r} has no domain: give --domain")
        if not _LOCAL_RE.fullmatch(local) or ".." in local:
            raise UserError(f"bad login name {login!r}: use letters, digits and . _ + = -")
        if not _DOMAIN_RE.fullmatch(dom):
            raise UserError(f"bad domain name {dom!r}")
        return name, local, dom

    def default_maildir(self, local: str, domain: str) -> Path:
        return self.data_dir / "mail" / domain / local

    def add(
        self,
        login: str,
        password: str,
        *,
        domain: str | None = None,
        addresses: Sequence[str] = (),
        maildir: Path | None = None,
        apop: bool = False,
        enabled: bool = True,
        password_hash: str | None = None,
    ) -> Account:
        """Create a user and its Maildir (0700). Returns the account.

        ``password_hash`` (already validated, e.g. imported) is stored instead of
        hashing ``password``.
        """
        new = self._prepare(login, domain=domain, addresses=addresses, maildir=maildir,
                            apop=apop, enabled=enabled,
                            stored=password_hash or self._hash_new(password))
        self._make_maildir(new.maildir)
        self._write(lambda db: self._insert(db, new))
        return self._by_login[new.login]

    def _prepare(self, login: str, *, domain: str | None, addresses: Sequence[str],
                 maildir: Path | None, apop: bool, enabled: bool, stored: str) -> _NewUser:
        name, local, dom = self.split_login(login, domain)
        primary = name if "@" in name else f"{name}@{dom}"
        addrs = [primary] + [a for a in (_address(x) for x in addresses) if a != primary]
        if len(set(addrs)) != len(addrs):
            raise UserError("an address is given twice")
        if self.find_account(name) is not None:
            raise UserError(f"user {name} exists")
        for a in addrs:
            owner = self.find_recipient(a)
            if owner is not None:
                raise UserError(f"address {a} belongs to {owner.login}")
        box = (maildir or self.default_maildir(local, dom)).absolute()
        secret = _new_apop_secret() if apop else None
        return _NewUser(name, dom, box, stored, secret, enabled, tuple(addrs))

    @staticmethod
    def _insert(db: sqlite3.Connection, new: _NewUser) -> None:
        # Checked again inside the transaction: another process may have added them.
        if db.execute("SELECT 1 FROM users WHERE login = ?", (new.login,)).fetchone():
            raise UserError(f"user {new.login} exists")
        for a in new.addresses:
            taken = db.execute("SELECT login FROM addresses WHERE address = ?", (a,)).fetchone()
            if taken:
                raise UserError(f"address {a} belongs to {taken[0]}")
        now = time.time()
        db.execute("INSERT INTO users (login, domain, maildir, password, apop_secret, "
                   "enabled, created_at, changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (new.login, new.domain, str(new.maildir), new.stored, new.apop_secret,
                    int(new.enabled), now, now))
        db.executemany("INSERT INTO addresses (address, login, position) VALUES (?, ?, ?)",
                       [(a, new.login, i) for i, a in enumerate(new.addresses)])

    def _make_maildir(self, box: Path) -> None:
        try:
            # Every directory we create on the way gets 0700, not just the leaf.
            missing = [p for p in (box, *box.parents) if not p.exists()]
            for p in reversed(missing):
                p.mkdir(mode=0o700, exist_ok=True)
            ensure_maildir(box, 0o700)
        except OSError as exc:
            raise UserError(f"cannot create Maildir {box}: {exc}") from None

    def _hash_new(self, password: str) -> str:
        if not password:
            raise UserError("empty password")
        if len(password) > MAX_PASSWORD_LENGTH:
            raise UserError(f"password longer than {MAX_PASSWORD_LENGTH} characters")
        return str(self.hasher.hash(password))

    def _require(self, login: str) -> Account:
        account = self.find_account(login)
        if account is None:
            raise NoSuchUser(f"no user {login}")
        return account

    def set_password(self, login: str, password: str) -> None:
        account = self._require(login)
        stored = self._hash_new(password)
        self._write(lambda db: db.execute(
            "UPDATE users SET password = ?, changed_at = ? WHERE login = ?",
            (stored, time.time(), account.login)))

    def set_enabled(self, login: str, enabled: bool) -> None:
        account = self._require(login)
        self._write(lambda db: db.execute(
            "UPDATE users SET enabled = ?, changed_at = ? WHERE login = ?",
            (int(enabled), time.time(), account.login)))

    def set_apop(self, login: str, enabled: bool) -> str | None:
        """Give the user a new random APOP secret (returned), or remove it."""
        account = self._require(login)
        secret = _new_apop_secret() if enabled else None
        self._write(lambda db: db.execute(
            "UPDATE users SET apop_secret = ?, changed_at = ? WHERE login = ?",
            (secret, time.time(), account.login)))
        return secret

    def set_addresses(self, login: str, addresses: Iterable[str]) -> Account:
        """Replace the extra addresses (the primary one always stays first)."""
        account = self._require(login)
        primary = account.primary_address
        addrs = [primary] + [a for a in (_address(x) for x in addresses) if a != primary]

        def replace(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM addresses WHERE login = ?", (account.login,))
            db.executemany("INSERT INTO addresses (address, login, position) VALUES (?, ?, ?)",
                           [(a, account.login, i) for i, a in enumerate(addrs)])

        self._write(replace)
        return self._by_login[account.login]

    def delete(self, login: str) -> Account:
        """Remove a user (its Maildir is left alone). Returns the removed account."""
        account = self._require(login)
        self._write(lambda db: db.execute("DELETE FROM users WHERE login = ?", (account.login,)))
        return account

    def import_passwd(self, lines: Iterable[str], *, domain: str | None = None,
                      update: bool = False) -> ImportResult:
        """Import ``user:hash[:...]`` lines, all or nothing.

        Blank lines and ``#`` comments are skipped. Errors name the line
        number. Existing users are an error unless ``update`` (then only their
        password hash is replaced).
        """
        entries: list[tuple[int, str, str]] = []
        errors: list[str] = []
        seen: set[str] = set()
        for n, raw in enumerate(lines, 1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, rest = line.partition(":")
            if not sep:
                errors.append(f"line {n}: expected user:hash")
                continue
            try:
                name, _, _ = self.split_login(user, domain)
                stored = normalize_imported_hash(rest.split(":", 1)[0])
            except UserError as exc:
                errors.append(f"line {n}: {exc}")
                continue
            if name in seen:
                errors.append(f"line {n}: {name} appears twice")
                continue
            seen.add(name)
            entries.append((n, user, stored))
        existing = {n: self.find_account(user) for n, user, _ in entries}
        if not update:
            errors += [f"line {n}: user {a.login} exists (use --update)"
                       for n, a in existing.items() if a is not None]
        fresh: list[_NewUser] = []
        updates: list[tuple[str, str]] = []
        claimed: dict[str, str] = {}
        for n, user, stored in entries:
            account = existing[n]
            if account is not None:
                updates.append((account.login, stored))
                continue
            try:
                new = self._prepare(user, domain=domain, addresses=(), maildir=None,
                                    apop=False, enabled=True, stored=stored)
            except UserError as exc:
                errors.append(f"line {n}: {exc}")
                continue
            if new.addresses[0] in claimed:
                errors.append(f"line {n}: address {new.addresses[0]} is also "
                              f"{claimed[new.addresses[0]]}'s")
                continue
            claimed[new.addresses[0]] = new.login
            fresh.append(new)
        if errors:
            raise UserError("; ".join(errors))
        for new in fresh:
            self._make_maildir(new.maildir)

        def run(db: sqlite3.Connection) -> None:
            for new in fresh:
                self._insert(db, new)
            now = time.time()
            db.executemany("UPDATE users SET password = ?, changed_at = ? WHERE login = ?",
                           [(stored, now, login) for login, stored in updates])

        self._write(run)
        return ImportResult(len(fresh), len(updates))


def open_directory(settings: Settings, *, hasher: PasswordHasher | None = None) -> UserDB:
    """The user database of ``settings``: ``<data_dir>/users.db``, created when missing."""
    return UserDB(settings.data_dir / "users.db", settings.auth, settings.data_dir,
                  hasher=hasher, default_domain=settings.local_domains[0],
                  ipv6_prefix=settings.ipv6_prefix)


def _address(raw: str) -> str:
    a = raw.strip().lower()
    local, at, dom = a.rpartition("@")
    if (not at or len(a) > MAX_NAME_LENGTH or not _ADDR_LOCAL_RE.fullmatch(local)
            or not _DOMAIN_RE.fullmatch(dom)):
        raise UserError(f"bad address {raw!r}")
    return a


def _new_apop_secret() -> str:
    # 18 random bytes, URL-safe: easy to paste into a mail client's password field.
    return secrets.token_urlsafe(18)


def _loggable(login: str) -> str:
    # A client may type anything as a user name; keep log lines short.
    return login[:MAX_NAME_LENGTH]


def _integrity_message(exc: sqlite3.IntegrityError) -> str:
    text = str(exc)
    if "addresses.address" in text:
        return "an address is already taken by another user"
    if "users.login" in text:
        return "user exists"
    return f"constraint violated: {text}"


__all__ = ["ImportResult", "NoSuchUser", "UserDB", "UserDBError", "UserError",
           "hash_scheme", "hasher_description", "normalize_imported_hash", "open_directory",
           "production_hasher"]
