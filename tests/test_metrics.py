"""The latency histogram's buckets, as Prometheus reads them; a group's metrics merged."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.config import UpstreamSettings
from proxy.hub import Hub
from proxy.metrics import LatencyHistogram, Metrics, Snapshot, merge, monotonic, render
from proxy.upstream import UpstreamBridge


def test_buckets_are_cumulative_and_end_with_inf() -> None:
    h = LatencyHistogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.005, 0.05, 5.0):
        h.observe(value)
    family = h.family("x_seconds", "doc")
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("x_seconds_bucket", "0.001")] == 2  # le is inclusive
    assert got[("x_seconds_bucket", "0.01")] == 3
    assert got[("x_seconds_bucket", "0.1")] == 4
    assert got[("x_seconds_bucket", "+Inf")] == 5
    assert got[("x_seconds_count", None)] == 5
    assert abs(got[("x_seconds_sum", None)] - 5.0565) < 1e-9


# --- A group's metrics: snapshots merged across workers -------------------------------


def counter(name: str, value: float, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "counter",
        "help": "doc",
        "samples": [[f"{name}_total", labels, value]],
    }


def gauge(name: str, value: float) -> dict[str, Any]:
    return {"name": name, "type": "gauge", "help": "doc", "samples": [[name, {}, value]]}


def values(snap: Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s, tuple(sorted(labels.items()))): v for f in snap for s, labels, v in f["samples"]}


def test_one_worker_renders_exactly_as_its_own_registry() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    bridge = UpstreamBridge(UpstreamSettings(), hub)
    metrics = Metrics(hub, bridge)
    metrics.delivery_latency.observe(0.003)
    metrics.auth_failures["bad-signature"] += 2
    metrics.limited["too-many-streams"] += 1
    assert render(merge([metrics.snapshot()])) == metrics.render()


def test_counters_and_gauges_are_summed_and_upstream_live_is_the_lowest() -> None:
    a = [counter("kep_x", 2, reason="r1"), gauge("kep_clients", 3), gauge("kep_upstream_live", 1)]
    b = [counter("kep_x", 5, reason="r1"), counter("kep_x", 1, reason="r2")]
    b += [gauge("kep_clients", 4), gauge("kep_upstream_live", 0)]
    got = values(merge([a, b]))
    assert got[("kep_x_total", (("reason", "r1"),))] == 7
    assert got[("kep_x_total", (("reason", "r2"),))] == 1
    assert got[("kep_clients", ())] == 7
    assert got[("kep_upstream_live", ())] == 0
    assert values(merge([a, [gauge("kep_upstream_live", 1)]]))[("kep_upstream_live", ())] == 1


@given(
    st.lists(
        st.tuples(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000)),
        min_size=1,
        max_size=8,
    )
)
def test_a_dead_workers_counters_stay_so_the_group_never_counts_down(
    steps: list[tuple[int, int, int]],
) -> None:
    """Each step: worker 1 counts more, then dies (its last report retired) and a fresh
    one starts from zero; the group's counter must never go down."""
    retired: Snapshot = []
    previous = 0.0
    other = 0
    for grow, more_other, fresh in steps:
        other += more_other
        dying = [counter("kep_x", previous + grow), gauge("kep_clients", 9)]
        before = values(merge([retired, dying, [counter("kep_x", other)]]))
        retired = merge([retired, monotonic(dying)])
        after = values(merge([retired, [counter("kep_x", fresh)], [counter("kep_x", other)]]))
        assert after[("kep_x_total", ())] >= before[("kep_x_total", ())]
        assert all(f["type"] != "gauge" for f in retired)
        previous = fresh
