"""In-memory reference store: the contract in its simplest form, for tests."""

from __future__ import annotations

import threading

from relaygate.addresses import require_canonical
from relaygate.grants import Grant


class MemoryStore:
    kind = "memory"

    def __init__(self) -> None:
        self._grants: dict[str, Grant] = {}
        self._lock = threading.Lock()

    def put(self, grant: Grant) -> None:
        require_canonical(grant.ip)  # the same refusal as the real stores
        with self._lock:
            self._grants[grant.ip] = grant

    def get(self, ip: str, now: float) -> Grant | None:
        require_canonical(ip)
        with self._lock:
            g = self._grants.get(ip)
            if g is None:
                return None
            if not g.live(now):
                del self._grants[ip]
                return None
            return g

    def delete(self, ip: str) -> bool:
        require_canonical(ip)
        with self._lock:
            return self._grants.pop(ip, None) is not None

    def delete_user(self, user: str) -> int:
        with self._lock:
            doomed = [ip for ip, g in self._grants.items() if g.user == user]
            for ip in doomed:
                del self._grants[ip]
            return len(doomed)

    def age(self, now: float) -> int:
        with self._lock:
            doomed = [ip for ip, g in self._grants.items() if not g.live(now)]
            for ip in doomed:
                del self._grants[ip]
            return len(doomed)

    def list(self, now: float) -> list[Grant]:
        with self._lock:
            live = [g for g in self._grants.values() if g.live(now)]
        return sorted(live, key=lambda g: (g.opened_at, g.ip))

    def close(self) -> None:
        pass
