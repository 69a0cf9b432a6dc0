"""Typed errors shared by the whole package.

Each error maps to exactly one outcome: an SMTP/POP/IMAP reply, an exit code
(qmail's 111 temporary / 100 permanent) or a one-line start-up message. This
module imports nothing so the chain programs can use it at no start-up cost.
"""

from __future__ import annotations


class RelaygateError(Exception):
    """Base class of every error relaygate raises on purpose."""


class InvalidAddress(RelaygateError, ValueError):
    """A client address that is not an IPv4 or IPv6 address.

    Raised before the value reaches a file name, an SQL parameter or a Redis
    key, so ``../x`` can never name a file outside the spool.
    """

    def __init__(self, value: object, why: str = "not an IPv4 or IPv6 address") -> None:
        self.value = value
        self.why = why
        super().__init__(f"invalid client address {value!r}: {why}")


class StoreError(RelaygateError):
    """The grant store could not be read or written (unreachable, locked, corrupt).

    Callers turn this into TEMPFAIL (SMTP 451, exit 111, policy DUNNO):
    a store failure must never let mail relay.
    """


class ConfigError(RelaygateError):
    """A bad configuration value; the message names its source and the value."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        value: object = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.value = value
        where = ""
        if source:
            where = source if line is None else f"{source}:{line}"
            where += ": "
        shown = "" if value is None else f": {value!r}"
        super().__init__(f"{where}{message}{shown}")
