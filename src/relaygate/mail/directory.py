"""The account directory interface: who has a mailbox, and who may log in.

The SMTP server asks it for local recipients and SMTP AUTH; POP3 and IMAP ask
it to authenticate. ``relaygate.mail.users`` is the real implementation
(SQLite, argon2id); tests may use :class:`StaticDirectory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Account:
    """A mailbox owner."""

    login: str
    domain: str
    maildir: Path
    #: addresses this account may send as (sender binding); the primary one first
    addresses: tuple[str, ...] = ()
    enabled: bool = True

    @property
    def primary_address(self) -> str:
        if self.addresses:
            return self.addresses[0]
        return self.login if "@" in self.login else f"{self.login}@{self.domain}"


@dataclass(frozen=True)
class LoginResult:
    account: Account | None
    throttled: bool = False

    @property
    def ok(self) -> bool:
        return self.account is not None and not self.throttled


class Directory(Protocol):
    def find_recipient(self, address: str) -> Account | None:
        """The account that receives mail for ``address`` (case-insensitive), or None."""
        ...

    async def authenticate(self, login: str, password: str, ip: str) -> LoginResult:
        """Check a password (off the event loop), applying throttling for ``ip`` and ``login``."""
        ...

    def find_account(self, login: str) -> Account | None:
        """The account whose login is ``login`` (case-insensitive), or None.

        The SMTP server uses it for sender binding: a relay window names the
        login that opened it, and MAIL FROM must be one of that account's addresses.
        """
        ...


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

    async def authenticate(self, login: str, password: str, ip: str) -> LoginResult:
        entry = self.accounts.get(login.lower())
        if entry is None or entry[1] != password or not entry[0].enabled:
            return LoginResult(None)
        return LoginResult(entry[0])
