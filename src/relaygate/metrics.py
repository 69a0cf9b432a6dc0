"""Counters and gauges for ``relaygate status`` and Prometheus.

One :class:`Metrics` per running system (its own registry, so tests can build
many). Names follow Prometheus conventions; labels are small closed sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.logins = Counter(
            "relaygate_logins", "Mailbox logins by protocol and result (ok, failed, throttled)",
            ["protocol", "result"], registry=r)
        self.windows = Counter(
            "relaygate_windows",
            "Relay windows by event (opened, refreshed, expired; failed: the store refused one)",
            ["event"], registry=r)
        self.decisions = Counter(
            "relaygate_relay_decisions", "Relay decisions by verdict and reason kind",
            ["verdict", "kind"], registry=r)
        self.messages = Counter(
            "relaygate_messages",
            "Messages by event (accepted, relayed, delivered, deferred, bounced)",
            ["event"], registry=r)
        self.queue_size = Gauge(
            "relaygate_queue_messages", "Messages in the outbound queue by state",
            ["state"], registry=r)
        self.connections = Gauge(
            "relaygate_connections", "Open client connections by service", ["service"],
            registry=r)
