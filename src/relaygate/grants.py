"""The Grant: one open relay window for one client address.

A plain ``__slots__`` class, not a dataclass: importing ``dataclasses`` cost
61 ms (30-149 ms) where ``_socket`` cost 0.8 ms (``python -X importtime``, five runs,
median and range, on the shared 2-core test machine under load, December 2026),
paid by the per-connection chain program ``relay-ctrl-check``.
"""

from __future__ import annotations

#: Where a grant came from; free text in the stores, these are the ones relaygate writes.
KNOWN_SOURCES = ("pop3", "imap", "smtp-auth", "qmail", "dovecot", "log", "cli", "policy")


class Grant:
    """A relay window: ``ip`` may relay from ``opened_at`` until ``expires_at`` (epoch seconds).

    ``ip`` is always canonical (see :func:`relaygate.addresses.parse_ip`);
    ``user`` and ``domain`` are whose login opened it (``None`` when unknown,
    e.g. a spool file written without ``$USER``).
    """

    __slots__ = ("domain", "expires_at", "ip", "opened_at", "source", "user")

    ip: str
    user: str | None
    domain: str | None
    source: str
    opened_at: float
    expires_at: float

    def __init__(
        self,
        ip: str,
        user: str | None,
        domain: str | None,
        source: str,
        opened_at: float,
        expires_at: float,
    ) -> None:
        # __setattr__ refuses every assignment: set the slots through their
        # descriptors (half the cost of object.__setattr__; a policy lookup makes one
        # Grant per hit).
        _SET_IP(self, ip)
        _SET_USER(self, user)
        _SET_DOMAIN(self, domain)
        _SET_SOURCE(self, source)
        _SET_OPENED_AT(self, float(opened_at))
        _SET_EXPIRES_AT(self, float(expires_at))

    @classmethod
    def opening(cls, ip: str, user: str | None, domain: str | None, source: str, now: float,
                ttl: float) -> Grant:
        """The window a login (or a chain program, the CLI...) opens at ``now`` for ``ttl``
        seconds; ``ip`` must already be canonical."""
        return cls(ip, user, domain, source, now, now + ttl)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Grant is immutable")

    def _key(self) -> tuple[object, ...]:
        return (self.ip, self.user, self.domain, self.source, self.opened_at, self.expires_at)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grant):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Grant(ip={self.ip!r}, user={self.user!r}, domain={self.domain!r}, "
            f"source={self.source!r}, opened_at={self.opened_at!r}, expires_at={self.expires_at!r})"
        )

    def live(self, now: float) -> bool:
        """True while the window is open (relay-ctrl: ``mtime + expiry >= now``)."""
        return self.expires_at >= now

    def replace(self, **changes: object) -> Grant:
        """A copy with some fields changed."""
        fields: dict[str, object] = {
            "ip": self.ip,
            "user": self.user,
            "domain": self.domain,
            "source": self.source,
            "opened_at": self.opened_at,
            "expires_at": self.expires_at,
        }
        fields.update(changes)
        return Grant(**fields)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        return {
            "ip": self.ip,
            "user": self.user,
            "domain": self.domain,
            "source": self.source,
            "opened_at": self.opened_at,
            "expires_at": self.expires_at,
        }


_SET_IP = Grant.__dict__["ip"].__set__
_SET_USER = Grant.__dict__["user"].__set__
_SET_DOMAIN = Grant.__dict__["domain"].__set__
_SET_SOURCE = Grant.__dict__["source"].__set__
_SET_OPENED_AT = Grant.__dict__["opened_at"].__set__
_SET_EXPIRES_AT = Grant.__dict__["expires_at"].__set__
