"""The benchmark harness at a tiny scale, so that it cannot rot (docs/benchmarks.md).

Runs ``python -m bench.run --smoke`` against this proxy (with one worker and with two),
the bare gRPC drain and the send floor (the systems that need no bench-only package)
with real processes on loopback, and checks that every scenario produced sane numbers.
The real benchmark is ``make bench``; it is never part of ``make test``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def test_bench_harness_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--smoke",
            "--systems",
            "proxy,proxy2,grpc,floor",
            "--out",
            str(out),
            "--no-plot",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    doc: dict[str, Any] = json.loads((out / "results.json").read_text())
    scale = doc["scale"]
    assert not doc["notes"], doc["notes"]
    proxy, proxy2, grpc, floor = (doc["results"][k] for k in ("proxy", "proxy2", "grpc", "floor"))

    ingest = proxy["ingest"]
    assert ingest["complete"]
    assert ingest["delivered"] == scale["ingest_events"]
    assert 1_000 < ingest["events_per_s"] < 10_000_000
    assert ingest["sut_cpu_s"] >= 0  # CPU time comes in 10 ms ticks: a tiny run may read 0
    assert ingest["paced"]["complete"]
    assert grpc["ingest"]["complete"]
    assert grpc["ingest"]["events_per_s"] > 1_000

    fanout = proxy["fanout"]
    latency, burst = fanout["latency"], fanout["burst"]
    assert latency["complete"]
    assert burst["complete"]
    assert (
        latency["delivered"]
        == latency["expected"]
        == int(scale["fanout_rate"] * scale["fanout_seconds"]) * scale["fanout_clients"]
    )
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] < 5_000
    assert burst["deliveries_per_s"] > 1_000
    assert burst["overflows"] == 0

    selective = proxy["selective"]
    assert selective["spread"]["complete"]
    assert selective["spread"]["delivered"] == scale["selective_burst"]
    for key in ("nonmatching_small", "nonmatching_large"):
        assert selective[key]["complete"]
        assert selective[key]["cpu_us_per_event"] >= 0
    ratio = selective["cpu_ratio_large_vs_small"]
    assert ratio is None or ratio > 0

    points = proxy["connections"]["points"]
    assert [p["connections"] for p in points] == scale["connection_counts"]
    assert all(1 < p["kib_per_connection"] < 1_000 for p in points)

    churn = proxy["churn"]
    assert churn["cycles"] == scale["churn_cycles"]
    assert churn["failed"] == 0
    assert churn["cycles_per_s"] > 0

    # The storm: every client back, nothing lost or twice, with one worker and two.
    for system in (proxy, proxy2):
        storm = system["storm"]
        assert storm["reconnected"] == scale["storm_clients"], storm
        assert storm["failed"] == 0
        assert storm["events_sent"] > 0
        assert (storm["lost"], storm["duplicated"]) == (0, 0), storm
        assert storm["storming"]["clients"] == scale["storm_clients"]
        assert storm["staying_tally"]["clients"] == scale["storm_staying"]
        assert 0 < storm["readmit_s"] < 60
        assert storm["sut_cpu_s"] >= 0
    # Two workers: fan-out and churn too, and only those three scenarios.
    assert set(proxy2) == {"fanout", "churn", "storm"}
    assert proxy2["fanout"]["latency"]["complete"]
    assert proxy2["churn"]["failed"] == 0

    # The floor runs the fan-out scenario only, and its p99 stands beside the target's.
    assert set(floor) - {"skipped"} == {"fanout"}, floor
    assert floor["fanout"]["latency"]["complete"]
    assert floor["fanout"]["burst"]["complete"]
    floor_p99 = floor["fanout"]["latency"]["p99_ms"]
    assert 0 < floor_p99 < 5_000
    (p99_target,) = (t for t in doc["targets"] if t["name"].startswith("fan-out p99"))
    assert f"send floor: {floor_p99:.1f} ms" in p99_target["detail"]
    assert len(proxy["ingest"]["runs_events_per_s"]) == scale["ingest_runs"]

    generations = proxy["generations"]
    rounds = generations["cpu_us_per_delivery"]
    assert len(rounds["one"]) == len(rounds["mixed"]) == 3, rounds
    assert generations["mixed_over_one"] is None or generations["mixed_over_one"] > 0

    storm = proxy["dashboard-storm"]
    assert storm["all_live"], storm
    assert storm["live"] == storm["connected"] == scale["dash_clients"]
    assert 0 < storm["median_live_s"] <= storm["all_live_s"] < 60
    # Each dashboard's state: a begin, one event per session, an end.
    assert storm["state_bytes_per_dashboard"] > 100 * scale["dash_sessions"]
    assert storm["flow"]["complete"]
    assert 0 < storm["flow"]["p99_ms"] < 5_000
    assert storm["rss_loaded_kib"] > 0

    statuses = {t["name"]: t["status"] for t in doc["targets"]}
    assert len(statuses) == 15
    assert set(statuses.values()) <= {"PASS", "FAIL", "N/A"}
    table = (out / "results.md").read_text()
    assert "| ingest: events/s" in table
    assert "s until all re-admitted |" in table
    assert "1b. this proxy, 2 workers" in table


def test_loopback_cost_measures_a_send_and_a_recv_per_delivery() -> None:
    from bench.loopback_cost import measure

    send, recv = measure(connections=5, rounds=3, size=193)
    assert 0 < send < 10_000
    assert 0 < recv < 10_000


def test_ingest_floor_writes_the_hubs_frames_byte_for_byte() -> None:
    # The floor in docs/benchmarks.md is only a floor if it does the proxy's work: the
    # same frames, in the same order, for both event sets micro_ingest builds.
    from bench.micro_ingest import BATCH, build_batches, floor_once, hub_frames

    for kind in ("sim", "replay"):
        batches = build_batches(2, kind=kind)
        frames: list[bytes] = []
        assert floor_once(batches, frames) > 0
        assert 0 < len(frames) <= 2 * BATCH  # less any sub-kernel events (not v4's)
        assert frames == hub_frames(batches)
