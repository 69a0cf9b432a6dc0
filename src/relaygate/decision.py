"""Relay decisions as values: ALLOW, DENY or TEMPFAIL, always with the reason.

qmail's three-way answer: a store that cannot be reached is TEMPFAIL (SMTP
``451 4.3.0``, exit 111, policy ``DUNNO``), never ALLOW.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    TEMPFAIL = "tempfail"

    # Members are singletons compared by identity, so the identity hash is a valid
    # one; Enum's own hashes the name in Python, a cost the policy service paid
    # twice per request (decisions are tallied by verdict and kind).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a client address may relay, and why.

    ``relayclient`` is the value qmail-smtpd would get in ``$RELAYCLIENT``
    (appended to each relayed recipient; ``""`` means plain relay); it is
    ``None`` unless the verdict is ALLOW. ``user``/``domain`` name whose login
    opened the window, for attribution. ``kind`` is a short machine-readable
    reason class for metrics: ``rule``, ``rule-deny``, ``grant``, ``none``,
    ``store``, ``invalid``, ``auth``.
    """

    verdict: Verdict
    reason: str
    kind: str
    relayclient: str | None = None
    user: str | None = None
    domain: str | None = None
    source: str | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    def as_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "kind": self.kind,
            "relayclient": self.relayclient,
            "user": self.user,
            "domain": self.domain,
            "source": self.source,
        }
