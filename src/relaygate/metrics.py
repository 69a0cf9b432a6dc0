"""Counters and gauges for ``relaygate status`` and Prometheus.

One :class:`Metrics` per running system (its own registry, so tests can build
many). Names follow Prometheus conventions; labels are small closed sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


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

    def watch_auth_cache(self, stats: Callable[[], tuple[int, int, int] | None]) -> None:
        """Export the credential cache's (hits, misses, entries), read at each scrape.

        ``stats`` returns None while the cache is off: nothing is exported then.
        """
        self.registry.register(_AuthCacheCollector(stats))


class _AuthCacheCollector:
    def __init__(self, stats: Callable[[], tuple[int, int, int] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        now = self._stats()
        if now is None:
            return
        hits, misses, entries = now
        lookups = CounterMetricFamily(
            "relaygate_auth_cache_lookups",
            "Credential-cache lookups by result (hit: the argon2id check was skipped)",
            labels=["result"])
        lookups.add_metric(["hit"], hits)
        lookups.add_metric(["miss"], misses)
        yield lookups
        yield GaugeMetricFamily("relaygate_auth_cache_entries",
                                "Verified logins in the credential cache", value=entries)

    def describe(self) -> Iterator[Metric]:
        return iter(())
