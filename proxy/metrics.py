"""Prometheus metrics (prometheus-client), read from the running objects at scrape time.

The hot path only bumps plain integers on the hub and the bridge; this collector turns
them into metric families when Prometheus asks. The delivery-latency histogram is the
one metric observed as it happens (once per write, not per event), into plain counts.

A group of workers (``serve --workers N``) answers one ``/metrics`` for all of them
(``group_view``): each worker's families as plain data (``snapshot``), summed by
``merge`` (gauges too, except the few in ``LOWEST``), rendered by ``render``. No
``worker`` label: a dashboard built on one process's metrics reads a group's the same
way and counts nothing twice. Every worker has its own upstream subscription, so the
families in ``PER_WORKER`` (each upstream event counted once by every worker) are
reported per worker: the group's sum divided by its workers. A worker that dies
leaves its counters behind (``monotonic``) so that the group's never go down.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from .hub import Hub
from .payloads import GENERATIONS
from .policy import Role
from .upstream import UpstreamBridge

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class LatencyHistogram:
    """Bucket counts kept as plain integers: observing is a bisect and an add.

    prometheus-client's Histogram takes a lock and walks its buckets on every
    observation; this runs once per write to a client, so it stays minimal and is
    turned into a metric family only at scrape time.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class Metrics:
    """Everything /metrics reports, with its own registry (no global state)."""

    def __init__(self, hub: Hub, bridge: UpstreamBridge) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.auth_failures: Counter[str] = Counter()
        self.delivery_latency = LatencyHistogram(_LATENCY_BUCKETS)
        self.registry.register(_Collector(hub, bridge, self.auth_failures, self.delivery_latency))
        # Requests refused by an abuse limit (limits.py), by error code.
        self.limited: Counter[str] = Counter()
        self.registry.register(_LimitsCollector(self.limited))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> Snapshot:
        return snapshot(self.registry)


# --- A group's metrics: families as plain data, merged across workers ---------------------

# [{"name", "type", "help", "samples": [[sample name, {label: value}, value], ...]}, ...]:
# what a worker reports to its supervisor (JSON).
Snapshot = list[dict[str, Any]]
# Gauges whose group value is the lowest of the workers' rather than their sum: the
# group's upstream is live (1) only when every worker's stream is.
LOWEST: Final = frozenset({"kep_upstream_live"})
# Counted once per upstream event by every worker (each has its own subscription): a
# group reports them per worker, so their rate is the upstream's, as with one process.
PER_WORKER: Final = frozenset(
    {"kep_upstream_events", "kep_upstream_malformed_events", "kep_events_published"}
)
# Families that only ever grow: a dead worker's last values stay in the group's.
_MONOTONIC: Final = frozenset({"counter", "histogram", "summary"})


def snapshot(registry: CollectorRegistry) -> Snapshot:
    return [
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [[s.name, dict(s.labels), s.value] for s in family.samples],
        }
        for family in registry.collect()
    ]


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One family per name, each sample the sum over ``snapshots`` (``LOWEST``: the
    minimum), in the order they first appear (a histogram's buckets stay in order)."""
    heads: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for snap in snapshots:
        for family in snap:
            name = family["name"]
            if name not in heads:
                heads[name] = {k: family[k] for k in ("name", "type", "help")}
                values[name] = {}
            samples = values[name]
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in samples:
                    samples[key] = value
                elif name in LOWEST:
                    samples[key] = min(samples[key], value)
                else:
                    samples[key] += value
    return [
        heads[name] | {"samples": [[s, dict(labels), v] for (s, labels), v in samples.items()]}
        for name, samples in values.items()
    ]


def monotonic(snap: Snapshot) -> Snapshot:
    """The families that only ever grow (what a dead worker leaves to its group)."""
    return [family for family in snap if family["type"] in _MONOTONIC]


def group_view(
    retired: Snapshot, workers: Iterable[Snapshot], configured: int, running: int, restarts: int
) -> Snapshot:
    """The group's ``/metrics``: what dead workers left (``retired``) and every live
    worker's last report, merged; ``PER_WORKER`` families divided by the configured
    workers (constant for the group's life, so they stay counters); the group's own."""
    merged = merge([retired, *workers])
    for family in merged:
        if family["name"] in PER_WORKER:
            family["samples"] = [[s, labels, v / configured] for s, labels, v in family["samples"]]
    return merged + _group_families(configured, running, restarts)


def _group_families(configured: int, running: int, restarts: int) -> Snapshot:
    return [
        {
            "name": "kep_workers",
            "type": "gauge",
            "help": "Worker processes serving (serve --workers), by state.",
            "samples": [
                ["kep_workers", {"state": "configured"}, configured],
                ["kep_workers", {"state": "running"}, running],
            ],
        },
        {
            "name": "kep_worker_restarts",
            "type": "counter",
            "help": "Worker processes that died and were started again.",
            "samples": [["kep_worker_restarts_total", {}, restarts]],
        },
    ]


class _Snapshot(Collector):
    def __init__(self, snap: Snapshot) -> None:
        self._snap = snap

    def collect(self) -> Iterator[Metric]:
        for family in self._snap:
            metric = Metric(family["name"], family["help"], family["type"])
            metric.samples = [Sample(s, labels, v) for s, labels, v in family["samples"]]
            yield metric


def render(snap: Snapshot) -> bytes:
    """Prometheus text for a snapshot (``merge``'s result)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(snap))
    return generate_latest(registry)


class _Collector(Collector):
    def __init__(
        self,
        hub: Hub,
        bridge: UpstreamBridge,
        auth_failures: Counter[str],
        latency: LatencyHistogram,
    ) -> None:
        self._hub = hub
        self._bridge = bridge
        self._auth_failures = auth_failures
        self._latency = latency

    def collect(self) -> Iterator[Metric]:
        hub, bridge = self._hub, self._bridge
        clients = GaugeMetricFamily(
            "kep_clients", "Connected event-stream clients, by role.", labels=["role"]
        )
        for role in Role:
            clients.add_metric([role.value], hub.clients_by_role.get(role.value, 0))
        yield clients
        by_api = GaugeMetricFamily(
            "kep_clients_by_api",
            "Connected event-stream clients, by API generation (v4: /stream/kernel/_/events, "
            "v5: /events/session).",
            labels=["api"],
        )
        opened = CounterMetricFamily(
            "kep_streams_opened", "Event streams admitted, by API generation.", labels=["api"]
        )
        for payload in GENERATIONS:
            api = payload.name.lower()
            by_api.add_metric([api], hub.clients_by_api.get(api, 0))
            opened.add_metric([api], hub.streams_opened.get(api, 0))
        yield by_api
        yield opened
        state = hub.state
        yield GaugeMetricFamily(
            "kep_state_sessions",
            "Sessions held in the state (initialState=true), their kernels with them.",
            value=len(state) if state is not None else 0,
        )
        yield CounterMetricFamily(
            "kep_state_evicted_sessions",
            "Sessions forgotten because state.max_entities was reached.",
            value=state.evicted if state is not None else 0,
        )
        yield CounterMetricFamily(
            "kep_state_writes", "States written to streams (initial and resync).",
            value=hub.state_writes,
        )  # fmt: skip
        yield CounterMetricFamily(
            "kep_state_reads", "States given as JSON (GET <stream path>/state).",
            value=hub.state_reads,
        )  # fmt: skip
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
            "kep_direct_streams",
            "Streams whose body the hub wrote straight to the socket (plain HTTP/1.1).",
            value=hub.direct_streams,
        )
        yield CounterMetricFamily(
            "kep_direct_write_stalls",
            "Direct writes a full socket took only part of (the rest waits in the stream's task).",
            value=hub.direct_stalls,
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
        yield self._latency.family(
            "kep_delivery_latency_seconds",
            "Time from an event being queued for a client to its write to the socket.",
        )


class _LimitsCollector(Collector):
    def __init__(self, limited: Counter[str]) -> None:
        self._limited = limited

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "kep_limited_requests",
            "Requests refused by an abuse limit (stream caps, sizes, login rates), by error.",
            labels=["error"],
        )
        for error, count in sorted(self._limited.items()):
            family.add_metric([error], count)
        yield family
