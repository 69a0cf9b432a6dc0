"""The grant-store interface every backend implements.

Contract (checked by ``tests/stores/test_contract.py`` against every backend):

- ``put(grant)`` stores the one live grant for ``grant.ip``, replacing any
  earlier one (a new login refreshes the window).
- ``get(ip, now)`` returns the live grant for a canonical address or ``None``;
  an expired grant is never returned (a backend may delete it on the way).
- ``delete(ip)`` / ``delete_user(user)`` remove grants and say how many.
- ``age(now)`` removes expired grants and returns how many it removed.
- ``list(now)`` returns the live grants, oldest first.
- Any failure to reach or read the backing storage raises
  :class:`relaygate.errors.StoreError`, which callers turn into TEMPFAIL.

Methods are synchronous: the chain programs and the CLI call them directly,
the asyncio servers through ``asyncio.to_thread`` (backends are thread-safe).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from relaygate.grants import Grant


@runtime_checkable
class GrantStore(Protocol):
    #: short name for logs and ``status``: memory, spool, sqlite, redis
    kind: str

    def put(self, grant: Grant) -> None: ...

    def get(self, ip: str, now: float) -> Grant | None: ...

    def delete(self, ip: str) -> bool: ...

    def delete_user(self, user: str) -> int: ...

    def age(self, now: float) -> int: ...

    def list(self, now: float) -> list[Grant]: ...

    def close(self) -> None: ...
