"""Login throttling: failures per client address and per account, in memory.

Theory of operation
-------------------
The mailbox login is the gate to relaying (POP/IMAP-before-SMTP), so guessing
passwords must be slow. Every failed login is recorded twice: under the client
address (``ip:<addr>``) and under the account name (``acct:<login>``). When a
key collects ``failures`` failures within ``window`` seconds it is *locked*
for ``lockout`` seconds, counted from the failure that tipped it over. While
either key of an attempt is locked, the attempt is refused without looking at
the password, so a locked login never succeeds, even with the right password.

Attempts refused while locked are not counted again: that would let an
attacker extend a victim's lockout forever with one packet a minute. (The
per-account key still lets anyone lock an account out for ``lockout`` seconds
by failing on purpose; that is the price of stopping distributed guessing, and
the per-address key alone would not.)

A successful login does not clear anything: failures simply age out. Clearing
them would let an attacker who owns one account reset the counter of the
address he guesses from.

The table is bounded (``MAX_KEYS``): when full, keys with nothing live in them
are dropped, then the oldest. State lives in one process; ``relaygate serve``
runs POP3, IMAP and SMTP AUTH in one process, so they share it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

#: keys remembered at once; each costs a few hundred bytes, so this caps the
#: table near 10 MB even when an IPv6 botnet rotates addresses
MAX_KEYS = 50_000
#: longest key kept as given (a login name or address); longer ones are cut so a
#: hostile client cannot make us store megabytes of "user name"
MAX_KEY_LENGTH = 320


@dataclass
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class Throttle:
    """Sliding-window failure counter with lockout (thread-safe)."""

    def __init__(self, failures: int, window: float, lockout: float,
                 *, max_keys: int = MAX_KEYS) -> None:
        if failures < 1 or window <= 0 or lockout <= 0 or max_keys < 1:
            raise ValueError("throttle limits must be positive")
        self.failures = failures
        self.window = window
        self.lockout = lockout
        self.max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def keys(ip: str, login: str) -> tuple[str, str]:
        """The two keys an attempt is counted under."""
        return (f"ip:{ip[:MAX_KEY_LENGTH]}", f"acct:{login.lower()[:MAX_KEY_LENGTH]}")

    def locked(self, ip: str, login: str, now: float | None = None) -> bool:
        """True when the address or the account is locked out right now."""
        t = time.monotonic() if now is None else now
        with self._lock:
            for key in self.keys(ip, login):
                entry = self._entries.get(key)
                if entry is not None and entry.locked_until > t:
                    return True
        return False

    def record_failure(self, ip: str, login: str, now: float | None = None) -> bool:
        """Count one failed attempt; return True when it locked a key."""
        t = time.monotonic() if now is None else now
        tipped = False
        with self._lock:
            for key in self.keys(ip, login):
                entry = self._entries.get(key)
                if entry is None:
                    self._make_room(t)
                    entry = self._entries[key] = _Entry()
                else:
                    self._entries.move_to_end(key)
                self._expire(entry, t)
                entry.failures.append(t)
                if len(entry.failures) >= self.failures and entry.locked_until <= t:
                    entry.locked_until = t + self.lockout
                    entry.failures.clear()
                    tipped = True
        return tipped

    def clear(self) -> None:
        """Forget everything (``relaygate`` admin use and tests)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _expire(self, entry: _Entry, t: float) -> None:
        horizon = t - self.window
        while entry.failures and entry.failures[0] <= horizon:
            entry.failures.popleft()

    def _live(self, entry: _Entry, t: float) -> bool:
        self._expire(entry, t)
        return bool(entry.failures) or entry.locked_until > t

    def _make_room(self, t: float) -> None:
        if len(self._entries) < self.max_keys:
            return
        for key in [k for k, e in self._entries.items() if not self._live(e, t)]:
            del self._entries[key]
        # Evict down to 90% so a full table under attack costs one scan per
        # max_keys/10 inserts, not one per insert.
        target = max(0, self.max_keys - max(1, self.max_keys // 10))
        while len(self._entries) > target:
            # Least recently failed first: an active attacker's keys stay.
            self._entries.popitem(last=False)
