"""RelayControl: static rules first, then grants, as one decision.

This is the only place that turns rules and grants into a Decision; the SMTP
handler, the Postfix policy service, ``relaygate tcpserver`` and the CLI all
ask it. A StoreError becomes TEMPFAIL here, so no caller can fail open.

A store that stays down would otherwise log one warning per decision (the
policy service makes thousands a second): :class:`StoreHealth` logs the first
failure at once, then at most one reminder every :data:`STORE_WARNING_INTERVAL`
seconds with the number of decisions refused meanwhile, and the recovery.
"""

from __future__ import annotations

import logging
import threading
import time

from relaygate.addresses import parse_ip
from relaygate.decision import Decision, Verdict
from relaygate.errors import InvalidAddress, RelaygateError, StoreError
from relaygate.grants import Grant
from relaygate.networks import Networks
from relaygate.rules import RuleSet
from relaygate.stores.base import GrantStore

log = logging.getLogger("relaygate.control")

#: relay-ctrl's default window: 15 minutes.
DEFAULT_EXPIRY = 900.0

#: The most common answer (a stranger), made once: a Decision is immutable.
NO_WINDOW = Decision(Verdict.DENY, "no static rule and no open window", "none")

#: Seconds between two "grant store still unreachable" warnings.
STORE_WARNING_INTERVAL = 10.0


class StoreHealth:
    """Whether lookups are failing, to warn about a failing store without flooding.

    ``failing`` is read without the lock on every successful lookup (a bool; a
    stale read only delays the recovery message to the next lookup).
    """

    def __init__(self, interval: float = STORE_WARNING_INTERVAL) -> None:
        self.interval = interval
        self.failing = False
        self._lock = threading.Lock()
        self._since = 0.0
        self._warned = 0.0
        self._refused = 0
        self._quiet = 0

    def failed(self, ip: str, exc: StoreError) -> None:
        with self._lock:
            now = time.monotonic()
            self._refused += 1
            if not self.failing:
                self.failing = True
                self._since = self._warned = now
                self._refused, self._quiet = 1, 0
                log.warning("grant store unreachable, refusing to relay for %s: %s", ip, exc)
            elif now - self._warned >= self.interval:
                log.warning("grant store still unreachable after %.0fs, refusing to relay "
                            "for %s: %s (%d more refused since the last warning)",
                            now - self._since, ip, exc, self._quiet)
                self._warned, self._quiet = now, 0
            else:
                self._quiet += 1

    def recovered(self) -> None:
        with self._lock:
            if not self.failing:
                return
            self.failing = False
            log.warning("grant store reachable again after %.0fs; %d relay decisions were "
                        "refused meanwhile", time.monotonic() - self._since, self._refused)


class WindowRefused(RelaygateError):
    """No window is opened for this address: it is a trusted proxy's own.

    Behind a load balancer every connection comes from the balancer; a window for
    its address would let everyone behind it relay. The login itself stands.
    """

    def __init__(self, ip: str) -> None:
        super().__init__(f"no relay window for {ip}: it is a trusted proxy")
        self.ip = ip


class RelayControl:
    """Decide whether a client address may relay; open and close windows."""

    def __init__(
        self,
        store: GrantStore,
        rules: RuleSet | None = None,
        *,
        expiry: float = DEFAULT_EXPIRY,
        relayclient: str = "",
        trusted_proxies: Networks | None = None,
    ) -> None:
        if expiry <= 0:
            raise ValueError("expiry must be positive")
        self.store = store
        #: addresses no window is ever opened for (see :class:`WindowRefused`)
        self.trusted_proxies = trusted_proxies if trusted_proxies is not None else Networks()
        self.rules = rules if rules is not None else RuleSet.empty()
        self.expiry = float(expiry)
        self.relayclient = relayclient
        self.health = StoreHealth()

    # -- windows -----------------------------------------------------------

    def allow(self, grant: Grant) -> Grant:
        """Record a grant (its ip must already be canonical). StoreError propagates;
        WindowRefused for a trusted proxy's address."""
        if grant.ip in self.trusted_proxies:
            raise WindowRefused(grant.ip)
        self.store.put(grant)
        return grant

    def open_window(
        self,
        ip: str,
        *,
        user: str | None,
        domain: str | None = None,
        source: str,
        now: float | None = None,
        ttl: float | None = None,
    ) -> Grant:
        """Parse ``ip``, build a grant for ``ttl`` (default: the expiry) and store it."""
        t = time.time() if now is None else now
        return self.allow(Grant.opening(parse_ip(ip), user, domain, source, t,
                                        ttl or self.expiry))

    def revoke(self, ip: str) -> bool:
        return self.store.delete(parse_ip(ip))

    def revoke_user(self, user: str) -> int:
        return self.store.delete_user(user)

    def age(self, now: float | None = None) -> int:
        return self.store.age(time.time() if now is None else now)

    def list(self, now: float | None = None) -> list[Grant]:
        return self.store.list(time.time() if now is None else now)

    # -- decisions ---------------------------------------------------------

    def decide(self, ip: str, now: float | None = None) -> Decision:
        """The relay decision for a client address; never raises for bad input or store errors."""
        try:
            canonical = parse_ip(ip)
        except InvalidAddress as exc:
            return Decision(Verdict.DENY, f"invalid client address: {exc.why}", "invalid")
        return self.decide_canonical(canonical, now)

    def decide_canonical(self, canonical: str, now: float | None = None) -> Decision:
        """:meth:`decide` for an address already in canonical form (the policy service
        parses each ``client_address`` once, before it asks)."""
        rule = self.rules.match(canonical)
        if rule is not None:
            if not rule.allow:
                return Decision(Verdict.DENY, f"rule {rule.describe()} denies", "rule-deny")
            if rule.relays:
                return Decision(
                    Verdict.ALLOW,
                    f"rule {rule.describe()}",
                    "rule",
                    relayclient=rule.relayclient,
                    source="rule",
                )
        t = time.time() if now is None else now
        try:
            grant = self.store.get(canonical, t)
        except StoreError as exc:
            self.health.failed(canonical, exc)
            return Decision(Verdict.TEMPFAIL, f"grant store unreachable: {exc}", "store")
        if self.health.failing:
            self.health.recovered()
        if grant is None:
            return NO_WINDOW
        who = grant.user or "(unknown user)"
        # Positional (verdict, reason, kind, relayclient, user, domain, source): a
        # third cheaper than keywords, and the policy service makes one per hit.
        return Decision(
            Verdict.ALLOW,
            f"window opened by {who} via {grant.source}, expires in {int(grant.expires_at - t)}s",
            "grant",
            self.relayclient,
            grant.user,
            grant.domain,
            grant.source,
        )
