"""The latency histogram's buckets, as Prometheus reads them."""

from __future__ import annotations

from proxy.metrics import LatencyHistogram


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
