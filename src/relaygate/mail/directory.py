"""An in-memory :class:`~relaygate.interfaces.Directory` with plaintext passwords.

For tests and examples only; ``relaygate.mail.accounts.db.UserDB`` is the real
directory (SQLite, argon2id, throttling).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from relaygate.interfaces import Account, LoginResult


@dataclass
class StaticDirectory:
    """An in-memory directory with plaintext passwords: for tests only."""

    accounts: dict[str, tuple[Account, str]] = field(default_factory=dict)

    def add(self, account: Account, password: str) -> None:
        self.accounts[account.login.lower()] = (account, password)

    def list(self) -> list[Account]:
        return [account for account, _ in self.accounts.values()]

    def find_account(self, login: str) -> Account | None:
        entry = self.accounts.get(login.lower())
        return entry[0] if entry is not None else None

    def find_recipient(self, address: str) -> Account | None:
        a = address.lower()
        for account, _ in self.accounts.values():
            if a == account.primary_address.lower() or a in (x.lower() for x in account.addresses):
                return account
        return None

    async def authenticate(self, login: str, password: str, ip: str, *,
                           service: str | None = None) -> LoginResult:
        entry = self.accounts.get(login.lower())
        if entry is None or entry[1] != password or not entry[0].enabled:
            return LoginResult(None)
        return LoginResult(entry[0])

    async def authenticate_apop(self, login: str, timestamp: str, digest: str, ip: str, *,
                                service: str | None = "pop3") -> LoginResult:
        """APOP with the plaintext password as the shared secret."""
        entry = self.accounts.get(login.lower())
        if entry is None or not entry[0].enabled:
            return LoginResult(None)
        expected = hashlib.md5((timestamp + entry[1]).encode(), usedforsecurity=False).hexdigest()
        ok = hmac.compare_digest(expected.encode(), digest.lower().encode("utf-8", "replace"))
        return LoginResult(entry[0] if ok else None)

    def reload(self) -> None:
        pass

    def close(self) -> None:
        pass
