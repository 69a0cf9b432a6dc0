"""Login throttling: failures per client address and per account, in memory.

Theory of operation
-------------------
The mailbox login is the gate to relaying (POP/IMAP-before-SMTP), so guessing
passwords must be slow. Every failed login is recorded twice: under the client
address (``ip:<addr>``; an IPv6 address under its network of ``ipv6_prefix``
bits, default /64, since one host owns a whole /64) and under the account name
(``acct:<login>``). When a key collects ``failures`` failures within
``window`` seconds it is *locked* for ``lockout`` seconds, counted from the
failure that tipped it over. While
either key of an attempt is locked, the attempt is refused without looking at
the password, so a locked login never succeeds, even with the right password.

An attempt is counted when it *starts*, not when its password check ends:
:meth:`Throttle.begin` reserves a place under both keys, and an attempt is
refused without looking at the password while a key's recent failures plus its
attempts still in flight reach ``failures``. Otherwise every attempt that
arrived before the first failures were recorded would get a full check, and
twenty simultaneous guesses (or sixty from sixty addresses) would all be
tried, whatever the lockout says. The reservation ends with the attempt:
:meth:`Attempt.failed` turns it into a failure (which may lock the key),
:meth:`Attempt.succeeded` and :meth:`Attempt.abandoned` just release it, so a
success leaves no phantom count behind. At most ``failures`` password checks
per key can therefore happen in a window, in whatever order they finish.

Attempts refused while locked or over budget are not counted again: that
would let an attacker extend a victim's lockout forever with one packet a
minute. (The
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

from relaygate.addresses import DEFAULT_IPV6_PREFIX, check_ipv6_prefix, client_group

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
    #: attempts begun under this key whose password check has not ended yet
    in_flight: int = 0


class Attempt:
    """One login attempt's reservation under its address and account keys.

    End it exactly once: :meth:`failed`, :meth:`succeeded` or :meth:`abandoned`
    (further calls do nothing, so a ``finally`` can always call one).
    """

    __slots__ = ("_open", "_throttle", "keys")

    def __init__(self, throttle: Throttle, keys: tuple[str, str]) -> None:
        self._throttle = throttle
        self.keys = keys
        self._open = True

    def failed(self, now: float | None = None) -> bool:
        """The check failed: count it; return True when that locked a key."""
        if not self._open:
            return False
        self._open = False
        return self._throttle._finish(self.keys, failed=True, now=now)

    def succeeded(self) -> None:
        """The check passed: release the reservation, count nothing."""
        self._release()

    def abandoned(self) -> None:
        """The check could not be made (e.g. the database is down): release it."""
        self._release()

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._throttle._finish(self.keys, failed=False, now=None)


class Throttle:
    """Sliding-window failure counter with lockout (thread-safe)."""

    def __init__(self, failures: int, window: float, lockout: float,
                 *, max_keys: int = MAX_KEYS, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> None:
        if failures < 1 or window <= 0 or lockout <= 0 or max_keys < 1:
            raise ValueError("throttle limits must be positive")
        self.ipv6_prefix = check_ipv6_prefix(ipv6_prefix)
        self.failures = failures
        self.window = window
        self.lockout = lockout
        self.max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def keys(self, ip: str, login: str) -> tuple[str, str]:
        """The two keys an attempt is counted under (IPv6 by its ``ipv6_prefix`` network)."""
        group = client_group(ip[:MAX_KEY_LENGTH], self.ipv6_prefix)
        return (f"ip:{group}", f"acct:{login.lower()[:MAX_KEY_LENGTH]}")

    def begin(self, ip: str, login: str, now: float | None = None) -> Attempt | None:
        """Reserve an attempt under both keys, or return None (refuse it unchecked).

        None while either key is locked or its budget is spent: recent failures
        plus attempts in flight already reach ``failures``. The check and the
        reservation are one step under the lock, so concurrent attempts cannot
        all slip in before the first of them is counted.
        """
        t = time.monotonic() if now is None else now
        keys = self.keys(ip, login)
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if entry.locked_until > t:
                    return None
                self._expire(entry, t)
                if len(entry.failures) + entry.in_flight >= self.failures:
                    return None
            for key in keys:
                self._entry(key, t).in_flight += 1
        return Attempt(self, keys)

    def in_flight(self, ip: str, login: str) -> tuple[int, int]:
        """Attempts in flight under the address key and the account key."""
        ip_key, acct_key = self.keys(ip, login)
        with self._lock:
            ip_entry, acct_entry = self._entries.get(ip_key), self._entries.get(acct_key)
            return (ip_entry.in_flight if ip_entry is not None else 0,
                    acct_entry.in_flight if acct_entry is not None else 0)

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
        """Count one failed attempt made without :meth:`begin`; True when it locked a key."""
        t = time.monotonic() if now is None else now
        with self._lock:
            return self._fail(self.keys(ip, login), t)

    def _finish(self, keys: tuple[str, str], *, failed: bool, now: float | None) -> bool:
        t = time.monotonic() if now is None else now
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                # The entry may have been evicted meanwhile (table full): nothing to release.
                if entry is not None and entry.in_flight > 0:
                    entry.in_flight -= 1
            return self._fail(keys, t) if failed else False

    def _entry(self, key: str, t: float) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            self._make_room(t)
            entry = self._entries[key] = _Entry()
        else:
            self._entries.move_to_end(key)
        return entry

    def _fail(self, keys: tuple[str, str], t: float) -> bool:
        tipped = False
        for key in keys:
            entry = self._entry(key, t)
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
        return bool(entry.failures) or entry.locked_until > t or entry.in_flight > 0

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
