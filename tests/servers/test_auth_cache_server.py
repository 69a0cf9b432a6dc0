"""The credential cache behind a real POP3 service: a hit still opens the window, a wrong
password still fails, and only the argon2id check is skipped."""

from __future__ import annotations

import asyncio
import poplib
from pathlib import Path

from argon2 import PasswordHasher
from pop3_harness import POP3From, start_pop3

from relaygate.config import AuthSettings


class CountingHasher(PasswordHasher):
    checks = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        type(self).checks += 1
        return bool(super().verify(hash, password))


def login(port: int, source: str, password: str) -> bool:
    c = POP3From("127.0.0.1", port, source)
    try:
        c.user("alice")
        try:
            c.pass_(password)
        except poplib.error_proto:
            return False
        return True
    finally:
        c.quit()


async def test_repeated_pop3_logins_are_checked_once(tmp_path: Path) -> None:
    auth = AuthSettings(failure_delay=0.0, cache_ttl=60.0, cache_size=10)
    h = await start_pop3(tmp_path, auth=auth)
    try:
        h.db.add("alice", "alice-pw")
        h.db.hasher = CountingHasher(time_cost=1, memory_cost=8, parallelism=1)
        CountingHasher.checks = 0
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            assert await asyncio.to_thread(login, h.port(), source, "alice-pw")
            grant = h.grant(source)
            assert grant is not None and grant.user == "alice"
        assert CountingHasher.checks == 1
        assert not await asyncio.to_thread(login, h.port(), "127.0.0.5", "alice-pW")
        assert h.grant("127.0.0.5") is None
        assert CountingHasher.checks == 2
        assert h.db.cache_stats() == (2, 2, 1)
        assert h.metric("relaygate_logins_total", protocol="pop3", result="ok") == 3
        assert h.metric("relaygate_logins_total", protocol="pop3", result="failed") == 1
    finally:
        await h.stop()
