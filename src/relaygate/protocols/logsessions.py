"""Two-line logins and open sessions: what log events mean for relay windows.

Theory of operation
-------------------
:class:`LoginTracker` takes the :class:`~relaygate.protocols.loglines.LogEvent`
of each line, in log order, and says which windows to open (or refresh). It
does no I/O and reads no clock: every call gets ``now`` (monotonic seconds),
so tests drive it with a fake clock.

Two-line logins (popa3d, older vm-pop3d, solid-pop3d without extended logging,
GNU pop3d behind tcpd): a ``connect`` line remembers the client address under
(server, daemon tag, pid); the ``auth`` line of the same daemon and pid, later,
opens the window for that address and forgets it. Bounds:

- a connect line not followed by a success within ``pending_ttl`` seconds is
  forgotten (the client never logged in; a success after that opens nothing);
- at most ``max_pending`` connections are remembered (the oldest go first);
- a new connect line of the same daemon and pid replaces the old one, and a
  success consumes it: a pid reused by a later process never inherits an
  older connection's address (its own connect line comes first).

Sessions (servers that log logouts: Dovecot, Courier, UW, a Dovecot proxy): a
login opens a session under its group (e.g. server, service, user, address)
and a logout closes one (the one with the same session id when the server
logs one, else the oldest of the group). While an address has a session open,
:meth:`LoginTracker.due` asks for its window to be refreshed every
``refresh_every`` seconds (less than the window's expiry, so it never lapses).
When its last session closes, the window is refreshed once more (if it was
not just refreshed), so it lasts the ordinary expiry after the logout, and is
then left to expire. A session never logged out stops counting
``max_session`` seconds after its login (default 12 hours); at most
``max_sessions`` sessions are kept (the oldest go first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from relaygate.protocols.loglines import LogEvent, LoginEvent

#: seconds a connect line waits for its success line
PENDING_TTL = 300.0
#: most connect lines waiting for their success line
MAX_PENDING = 10_000
#: most open sessions kept
MAX_SESSIONS = 100_000
#: default longest a session counts without a logout (seconds)
MAX_SESSION = 12 * 3600.0
#: a window refreshed less than this long ago is not refreshed again at logout
LOGOUT_REFRESH_MIN = 60.0


@dataclass
class _Session:
    group: tuple[bytes | str, ...]
    sid: bytes | None
    login: LoginEvent
    started: float


class LoginTracker:
    """Turns log events into window openings (see the module docstring)."""

    def __init__(self, *, refresh_every: float, max_session: float = MAX_SESSION,
                 pending_ttl: float = PENDING_TTL, max_pending: int = MAX_PENDING,
                 max_sessions: int = MAX_SESSIONS) -> None:
        if refresh_every <= 0 or max_session < 0:
            raise ValueError("refresh_every must be positive and max_session not negative")
        self.refresh_every = refresh_every
        self.max_session = max_session
        self.pending_ttl = pending_ttl
        self.max_pending = max_pending
        self.max_sessions = max_sessions
        #: (family, tag, pid) -> (address, time of the connect line); oldest first
        self._pending: OrderedDict[tuple[bytes | str, ...], tuple[str, float]] = OrderedDict()
        #: session number -> session; oldest first
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._groups: dict[tuple[bytes | str, ...], list[int]] = {}
        self._by_ip: dict[str, set[int]] = {}
        #: address -> when its window was last opened or refreshed
        self._refreshed: dict[str, float] = {}
        self._next = 0

    # -- inspection (tests, the pattern tester) --------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def open_addresses(self) -> set[str]:
        """Addresses with a session open now."""
        return set(self._by_ip)

    def pending_address(self, key: tuple[bytes | str, ...], now: float) -> str | None:
        got = self._pending.get(key)
        if got is None or now - got[1] > self.pending_ttl:
            return None
        return got[0]

    # -- events ------------------------------------------------------------------

    def feed(self, ev: LogEvent, now: float) -> LoginEvent | None:
        """The window to open for this event, if any."""
        self._expire_pending(now)
        if ev.kind == "connect":
            assert ev.ip is not None
            self._pending.pop(ev.key, None)
            self._pending[ev.key] = (ev.ip, now)
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
            return None
        if ev.kind == "auth":
            got = self._pending.pop(ev.key, None)
            if got is None:
                return None
            return LoginEvent(got[0], ev.user, ev.domain, ev.service, ev.pattern)
        if ev.kind == "login":
            login = ev.login()
            if ev.sessions and self.max_session > 0:
                self._open_session(ev, login, now)
            self._refreshed[login.ip] = now
            return login
        if ev.kind == "logout":
            return self._close_session(ev, now)
        return None

    def due(self, now: float) -> list[LoginEvent]:
        """Windows to refresh now: addresses with a session open and a window getting old."""
        self._expire_sessions(now)
        out: list[LoginEvent] = []
        for ip, tokens in self._by_ip.items():
            last = self._refreshed.get(ip, float("-inf"))
            if now - last >= self.refresh_every:
                newest = self._sessions[max(tokens)]
                out.append(replace(newest.login, refresh=True))
                self._refreshed[ip] = now
        return out

    # -- internals -------------------------------------------------------------------

    def _expire_pending(self, now: float) -> None:
        while self._pending:
            key, (_, t) = next(iter(self._pending.items()))
            if now - t <= self.pending_ttl:
                break
            del self._pending[key]

    def _open_session(self, ev: LogEvent, login: LoginEvent, now: float) -> None:
        token = self._next
        self._next += 1
        self._sessions[token] = _Session(ev.key, ev.sid, login, now)
        self._groups.setdefault(ev.key, []).append(token)
        self._by_ip.setdefault(login.ip, set()).add(token)
        while len(self._sessions) > self.max_sessions:
            self._drop(next(iter(self._sessions)))

    def _drop(self, token: int) -> _Session:
        s = self._sessions.pop(token)
        tokens = self._groups[s.group]
        tokens.remove(token)
        if not tokens:
            del self._groups[s.group]
        ips = self._by_ip[s.login.ip]
        ips.discard(token)
        if not ips:
            del self._by_ip[s.login.ip]
        return s

    def _expire_sessions(self, now: float) -> None:
        while self._sessions:
            token, s = next(iter(self._sessions.items()))
            if now - s.started < self.max_session:
                break
            self._drop(token)
            if s.login.ip not in self._by_ip:
                self._refreshed.pop(s.login.ip, None)

    def _close_session(self, ev: LogEvent, now: float) -> LoginEvent | None:
        self._expire_sessions(now)
        tokens = self._groups.get(ev.key)
        if not tokens:
            return None
        token = tokens[0]
        if ev.sid is not None:
            for t in tokens:
                if self._sessions[t].sid == ev.sid:
                    token = t
                    break
        s = self._drop(token)
        ip = s.login.ip
        if ip in self._by_ip:
            return None  # another session of this address is still open
        last = self._refreshed.pop(ip, float("-inf"))
        if now - last < LOGOUT_REFRESH_MIN:
            return None  # just opened: the window lasts the expiry from about now
        return replace(s.login, refresh=True)
