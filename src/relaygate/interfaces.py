"""The seams between the rooms, as typing Protocols: what servers ask of accounts, and
what a runtime asks of a service.

- :class:`Directory`: who has a mailbox, who may log in (``mail.accounts.db.UserDB``
  is the real one; ``mail.directory.StaticDirectory`` an in-memory one for tests);
- :class:`Service`: one long-running part of a process (a server's listeners, the
  delivery worker), started, reloaded and stopped by ``servers.runtime``.

:class:`Account` and :class:`LoginResult` are the values that cross the Directory seam.
No I/O here, and nothing from ``servers/`` or ``commands/``.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """Who has a mailbox and who may log in: what every server asks about accounts.

    ``ip`` is the client address throttling counts failures under (canonical;
    ``"unix"`` for a UNIX-socket client); ``service`` names the protocol in the
    log lines (``pop3``, ``imap``, ``smtp``).
    """

    def find_recipient(self, address: str) -> Account | None:
        """The account that receives mail for ``address`` (case-insensitive), or None."""
        ...

    def find_account(self, login: str) -> Account | None:
        """The account whose login is ``login`` (case-insensitive), or None.

        The SMTP server uses it for sender binding: a relay window names the
        login that opened it, and MAIL FROM must be one of that account's addresses.
        """
        ...

    async def authenticate(self, login: str, password: str, ip: str, *,
                           service: str | None = None) -> LoginResult:
        """Check a password (off the event loop), applying throttling for ``ip`` and ``login``."""
        ...

    async def authenticate_apop(self, login: str, timestamp: str, digest: str, ip: str, *,
                                service: str | None = "pop3") -> LoginResult:
        """RFC 1939 APOP: ``digest`` is MD5(``timestamp`` + the account's secret), hex."""
        ...

    def reload(self) -> None:
        """SIGHUP: see changes made by other processes (``relaygate users``)."""
        ...

    def close(self) -> None: ...


class Service(Protocol):
    """A part of a process that ``servers.runtime`` starts, reloads and stops."""

    name: str

    def listeners(self) -> list[str]:
        """Human-readable addresses it listens on, e.g. ``smtp 127.0.0.1:2525``."""
        ...

    async def start(self) -> None:
        """Bind the listeners (or start the work); OSError when an address cannot be bound."""
        ...

    def reload(self) -> None:
        """SIGHUP: re-read what the service itself reads from files (may do nothing)."""
        ...

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; let work in flight finish for up to ``grace`` seconds."""
        ...
