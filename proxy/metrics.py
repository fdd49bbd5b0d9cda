"""Prometheus metrics (prometheus-client), read from the running objects at scrape time.

The hot path only bumps plain integers on the hub and the bridge; this collector turns
them into metric families when Prometheus asks. The delivery-latency histogram is the
one metric observed as it happens: once per write, not once per event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .hub import Hub
from .policy import Role
from .upstream import UpstreamBridge

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class Metrics:
    """Everything /metrics reports, with its own registry (no global state)."""

    def __init__(self, hub: Hub, bridge: UpstreamBridge) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.auth_failures: Counter[str] = Counter()
        self.delivery_latency = Histogram(
            "kep_delivery_latency_seconds",
            "Time from an event being queued for a client to its write to the socket.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Collector(hub, bridge, self.auth_failures))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, hub: Hub, bridge: UpstreamBridge, auth_failures: Counter[str]) -> None:
        self._hub = hub
        self._bridge = bridge
        self._auth_failures = auth_failures

    def collect(self) -> Iterator[Metric]:
        hub, bridge = self._hub, self._bridge
        clients = GaugeMetricFamily(
            "kep_clients", "Connected event-stream clients, by role.", labels=["role"]
        )
        for role in Role:
            clients.add_metric([role.value], hub.clients_by_role.get(role.value, 0))
        yield clients
        yield CounterMetricFamily(
            "kep_upstream_events",
            "Events received from the upstream (malformed ones included).",
            value=bridge.received,
        )
        yield CounterMetricFamily(
            "kep_upstream_malformed_events",
            "Upstream events skipped because they could not be forwarded safely.",
            value=bridge.malformed,
        )
        yield CounterMetricFamily(
            "kep_events_published", "Events published to the hub.", value=hub.published
        )
        yield CounterMetricFamily(
            "kep_events_delivered", "Event frames queued for clients.", value=hub.delivered
        )
        yield CounterMetricFamily(
            "kep_events_dropped",
            "Event frames refused because a client's outbox was full.",
            value=hub.refused,
        )
        yield CounterMetricFamily(
            "kep_slow_clients_disconnected",
            "Clients disconnected because they read too slowly.",
            value=hub.dropped_clients,
        )
        yield CounterMetricFamily(
            "kep_upstream_connects", "Upstream subscription attempts.", value=bridge.connects
        )
        yield GaugeMetricFamily(
            "kep_upstream_live", "1 while the upstream stream is live.", value=int(bridge.live)
        )
        failures = CounterMetricFamily(
            "kep_auth_failures", "Rejected authentication attempts, by reason.", labels=["reason"]
        )
        for reason, count in sorted(self._auth_failures.items()):
            failures.add_metric([reason], count)
        yield failures
