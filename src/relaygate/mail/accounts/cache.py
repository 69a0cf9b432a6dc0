"""The verified-credential cache: skip the argon2id check for a login that just succeeded.

Theory of operation
-------------------
An argon2id check with the production parameters costs tens of milliseconds
of CPU and 64 MiB (``docs/users.md`` has the measured figure). Mail clients
log in again and again with the same password (POP3 polls every few minutes,
phones open several IMAP connections at once), so a server with many users
spends most of its login CPU proving what it proved a minute ago. Like
Dovecot's ``auth_cache``, this cache remembers recent *successful* checks for
``auth.cache_ttl`` seconds, at most ``auth.cache_size`` of them (least
recently used dropped first). It is off by default (``cache_ttl = 0``).

What is stored: nothing but a 32-byte BLAKE2b digest keyed with a random
key made when the process starts (never written anywhere) over the account
name, the account's stored hash string and the password, mapped to the time
the entry expires. Neither the password nor an unkeyed hash of it is kept,
so the table says nothing without the key, and the key dies with the
process. (Someone who can read the process's memory gets both; for the cached
users they can then test guesses at BLAKE2b speed instead of argon2id speed:
that is the price of the cache, and why it is off unless asked for.)

Invalidation needs no messages between processes: the stored hash string is
part of the key, and the caller (:meth:`relaygate.mail.accounts.db.UserDB._cached_sync`,
on a worker thread but not on the argon2id pool, so a hit never queues behind
full checks) reads the user's row from SQLite on every login, hit or miss, as
the login without the cache does. ``relaygate users passwd`` writes a new hash string (a new
salt, even for the same password), so the old entry is never looked up
again; ``users del`` removes the row, so there is nothing to look up;
``users disable`` clears the row's ``enabled`` column, which is read from the
same row on every hit. Another process's change therefore counts from its
commit, at the cost of one indexed SQLite read per login (which the
uncached path pays anyway). ``SIGHUP`` empties the cache
(:meth:`CredentialCache.clear`).

The cache sits after the throttle: an attempt is counted and refused exactly
as without it (a locked-out address or account never reaches the cache), and
a failed check is never stored, so a wrong password always costs a full
argon2id check and counts as a failure.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from relaygate.config import AUTH_CACHE_MAX_SIZE as MAX_SIZE
from relaygate.config import AUTH_CACHE_MAX_TTL as MAX_TTL


class CredentialCache:
    """Recently verified (account, stored hash, password) triples, by keyed digest (thread-safe)."""

    def __init__(self, ttl: float, size: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"cache TTL must be above 0 and at most {MAX_TTL:g} seconds")
        if not 0 < size <= MAX_SIZE:
            raise ValueError(f"cache size must be between 1 and {MAX_SIZE}")
        self.ttl = float(ttl)
        self.size = int(size)
        self._clock = clock
        self._key = secrets.token_bytes(32)  # per process, never persisted
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _digest(self, login: str, stored: str, password: str) -> bytes | None:
        try:
            parts = [s.encode("utf-8") for s in (login, stored, password)]
        except UnicodeEncodeError:
            return None  # e.g. a lone surrogate: not cached, the full check decides
        h = hashlib.blake2b(key=self._key, digest_size=32, person=b"relaygate-auth")
        for part in parts:  # length-prefixed: no two triples feed the same bytes
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        return h.digest()

    def lookup(self, login: str, stored: str, password: str) -> bool:
        """True when this triple was verified within the TTL (counts a hit or a miss)."""
        key = self._digest(login, stored, password)
        now = self._clock()
        with self._lock:
            expires = self._entries.get(key) if key is not None else None
            if key is not None and expires is not None:
                if expires > now:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return True
                del self._entries[key]
            self.misses += 1
            return False

    def store(self, login: str, stored: str, password: str) -> None:
        """Remember a triple whose check has just succeeded."""
        key = self._digest(login, stored, password)
        if key is None:
            return
        expires = self._clock() + self.ttl
        with self._lock:
            self._entries[key] = expires
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry (``SIGHUP``)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
