"""Results into a table, ratios, PASS/FAIL per target, and a plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from .common import Json

Getter = Callable[[Json, Json], float | None]


def _get(result: Json, *path: str | int) -> float | None:
    node: Any = result
    for key in path:
        in_dict = isinstance(node, dict) and isinstance(key, str) and key in node
        in_list = isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node)
        if not (in_dict or in_list):
            return None
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def _delivered_pct(result: Json, doc: Json) -> float | None:
    delivered = _get(result, "fanout", "latency", "delivered")
    expected = _get(result, "fanout", "latency", "expected")
    return 100.0 * delivered / expected if delivered is not None and expected else None


def _rows(doc: Json) -> list[tuple[str, Getter, str]]:
    s = doc["scale"]
    n, rate, users = s["fanout_clients"], s["fanout_rate"], s["selective_users"]
    small = s["nonmatching_small"]
    counts = s["connection_counts"]
    rows: list[tuple[str, Getter, str]] = [
        (
            "ingest: events/s, one client sees all",
            lambda r, d: _get(r, "ingest", "events_per_s"),
            ",.0f",
        ),
        (
            "ingest: SUT CPU µs/event, burst (512 per upstream message)",
            lambda r, d: _get(r, "ingest", "cpu_us_per_event"),
            ",.1f",
        ),
        (
            f"paced: SUT CPU µs/event, {s['nonmatching_rate']:.0f} ev/s, 1 per message",
            lambda r, d: _get(r, "ingest", "paced", "cpu_us_per_event"),
            ",.1f",
        ),
        (
            f"fan-out: deliveries/s, {n:,} clients, burst of {s['fanout_burst']:,}",
            lambda r, d: _get(r, "fanout", "burst", "deliveries_per_s"),
            ",.0f",
        ),
        (
            f"fan-out: p50 latency ms, {n:,} clients, {rate:.0f} ev/s",
            lambda r, d: _get(r, "fanout", "latency", "p50_ms"),
            ",.1f",
        ),
        (
            f"fan-out: p99 latency ms, {n:,} clients, {rate:.0f} ev/s",
            lambda r, d: _get(r, "fanout", "latency", "p99_ms"),
            ",.1f",
        ),
        (
            f"fan-out: deliveries/s at {rate:.0f} ev/s, 1 per message (offered {n * rate:,.0f}/s)",
            lambda r, d: _get(r, "fanout", "latency", "deliveries_per_s"),
            ",.0f",
        ),
        (f"fan-out: % delivered in time at {rate:.0f} ev/s", _delivered_pct, ".1f"),
        (
            "fan-out: SUT CPU µs per delivery (burst)",
            lambda r, d: _get(r, "fanout", "burst", "cpu_us_per_delivery"),
            ",.2f",
        ),
        (
            f"selective: deliveries/s, {users:,} users, own sessions only",
            lambda r, d: _get(r, "selective", "spread", "deliveries_per_s"),
            ",.0f",
        ),
        (
            "selective: SUT CPU µs per event",
            lambda r, d: _get(r, "selective", "spread", "cpu_us_per_event"),
            ",.1f",
        ),
        (
            f"CPU µs/event, {small} non-matching clients",
            lambda r, d: _get(r, "selective", "nonmatching_small", "cpu_us_per_event"),
            ",.1f",
        ),
        (
            f"CPU µs/event, {users:,} non-matching clients",
            lambda r, d: _get(r, "selective", "nonmatching_large", "cpu_us_per_event"),
            ",.1f",
        ),
        (
            f"  ratio {users:,} vs {small}",
            lambda r, d: _get(r, "selective", "cpu_ratio_large_vs_small"),
            ".2f",
        ),
        (
            f"  idle CPU % with {users:,} connected",
            lambda r, d: _pct(_get(r, "selective", "nonmatching_large", "idle_cpu_util")),
            ".1f",
        ),
    ]
    # Before the RSS and churn rows: plot() counts those from the end.
    storm = f"storm of {s['storm_clients']:,} ({s['storm_staying']:,} staying, "
    storm += f"{s['storm_rate']:.0f} ev/s)"
    for label, path, spec in (
        (f"{storm}: s until all re-admitted", ("readmit_s",), ",.2f"),
        (
            "  SUT CPU ms per reconnect (all it did meanwhile, the flow included)",
            ("cpu_ms_per_reconnect",),
            ",.2f",
        ),
        (
            "  the same, net of the flow's CPU before the storm",
            ("cpu_ms_per_reconnect_net",),
            ",.2f",
        ),
        ("  staying clients' p50 latency ms during it", ("staying_p50_ms",), ",.1f"),
        ("  staying clients' p99 latency ms during it", ("staying_p99_ms",), ",.1f"),
        ("  events lost, all clients", ("lost",), ",.0f"),
        ("  events lost by the worst client", ("storming", "lost_max"), ",.0f"),
        ("  events received twice, all clients", ("duplicated",), ",.0f"),
    ):
        rows.append((label, _storm(*path), spec))
    # Before the rows counted from the end (the plot picks those by position).
    dashboards, sessions = s.get("dash_clients", 0), s.get("dash_sessions", 0)
    rows += [
        (
            f"dashboard storm: s until all {dashboards:,} dashboards are live "
            f"({sessions:,} sessions each)",
            lambda r, d: _get(r, "dashboard-storm", "all_live_s"),
            ",.2f",
        ),
        (
            f"dashboard storm: other clients' p99 ms meanwhile ({s.get('dash_others', 0):,} at "
            f"{s.get('dash_rate', 0):.0f} ev/s)",
            lambda r, d: _get(r, "dashboard-storm", "flow", "p99_ms"),
            ",.1f",
        ),
        (
            "dashboard storm: state KiB per dashboard",
            lambda r, d: _kib(_get(r, "dashboard-storm", "state_bytes_per_dashboard")),
            ",.0f",
        ),
        (
            "dashboard storm: RSS KiB per session in the state",
            lambda r, d: _get(r, "dashboard-storm", "kib_per_session"),
            ",.2f",
        ),
    ]
    for i, count in enumerate(counts):
        rows.append(
            (
                f"RSS KiB per idle connection at {count:,}",
                _point(i),
                ",.1f",
            )
        )
    rows += [
        (
            "churn: connect+disconnect cycles/s",
            lambda r, d: _get(r, "churn", "cycles_per_s"),
            ",.0f",
        ),
        (
            f"churn: RSS growth MiB after {s['churn_cycles']:,} cycles",
            lambda r, d: _get(r, "churn", "rss_growth_mib"),
            ",.1f",
        ),
    ]
    return rows


def _storm(*path: str) -> Getter:
    def get(result: Json, doc: Json) -> float | None:
        return _get(result, "storm", *path)

    return get


def _point(i: int) -> Getter:
    def get(result: Json, doc: Json) -> float | None:
        return _get(result, "connections", "points", i, "kib_per_connection")

    return get


def _at_least(bound: float) -> Callable[[float], bool]:
    return lambda v: v >= bound


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _kib(value: float | None) -> float | None:
    return None if value is None else value / 1024


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


SHORT: Final = {
    "proxy": "1. this proxy",
    "proxy2": "1b. this proxy, 2 workers",
    "aiohttp": "2. aiohttp (original)",
    "starlette": "3. sse-starlette",
    "nchan": "4. nginx+nchan",
    "grpc": "5. bare grpcio",
    "floor": "6. send floor",
}


def markdown(doc: Json) -> str:
    results: dict[str, Json] = doc["results"]
    systems = list(results)
    head = "| metric | " + " | ".join(SHORT.get(k, k) for k in systems) + " |"
    lines = [
        f"Mode: **{doc['mode']}**, {doc['when']}, {doc['machine'].get('cpus')} CPUs "
        f"({doc['machine'].get('cpu_model', '?')}), Python {doc['machine']['python']}, "
        f"run took {doc['elapsed_s']:.0f} s.",
        "",
        head,
        "|" + " --- |" * (len(systems) + 1),
    ]
    for label, getter, spec in _rows(doc):
        cells = [_fmt(getter(results.get(k, {}), doc), spec) for k in systems]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| auth | " + " | ".join(doc["systems"].get(k, {}).get("auth", "") for k in systems) + " |"
    )
    lines.append(
        "| filtering | "
        + " | ".join(doc["systems"].get(k, {}).get("filtering", "") for k in systems)
        + " |"
    )
    lines += ["", "Ratios (this proxy / other system, same run):", ""]
    lines += _ratios(doc)
    lines += ["", "Targets:", "", "| target | value | result |", "| --- | --- | --- |"]
    for t in doc.get("targets", []):
        lines.append(f"| {t['name']} | {t['detail']} | **{t['status']}** |")
    skipped = [f"{k}: {v['skipped']}" for k, v in results.items() if "skipped" in v]
    notes = skipped + list(doc.get("notes", []))
    incomplete = _incomplete(results)
    if notes or incomplete:
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in notes + incomplete]
    return "\n".join(lines) + "\n"


def _incomplete(results: dict[str, Json]) -> list[str]:
    out = []
    for system, scenarios in results.items():
        for scenario, result in scenarios.items():
            if not isinstance(result, dict):
                continue
            for name, phase in result.items():
                if isinstance(phase, dict) and phase.get("complete") is False:
                    out.append(
                        f"{system}/{scenario}/{name}: {phase['delivered']:,} of "
                        f"{phase['expected']:,} delivered before the time limit "
                        "(rates are over the time taken)"
                    )
            if result.get("complete") is False:
                out.append(
                    f"{system}/{scenario}: {result['delivered']:,} of {result['expected']:,} "
                    "delivered before the time limit"
                )
    return out


def _ratio(doc: Json, getter: Getter, other: str, invert: bool = False) -> float | None:
    results = doc["results"]
    mine = getter(results.get("proxy", {}), doc)
    theirs = getter(results.get(other, {}), doc)
    if not mine or not theirs:
        return None
    return theirs / mine if invert else mine / theirs


def _ratios(doc: Json) -> list[str]:
    metrics: list[tuple[str, Getter, bool]] = [
        ("ingest events/s", lambda r, d: _get(r, "ingest", "events_per_s"), False),
        (
            "fan-out deliveries/s",
            lambda r, d: _get(r, "fanout", "burst", "deliveries_per_s"),
            False,
        ),
        (
            "selective deliveries/s",
            lambda r, d: _get(r, "selective", "spread", "deliveries_per_s"),
            False,
        ),
        (
            "CPU per event, many non-matching (lower is better: other/this)",
            lambda r, d: _get(r, "selective", "nonmatching_large", "cpu_us_per_event"),
            True,
        ),
        (
            "RSS per idle connection (other/this)",
            lambda r, d: _get(r, "connections", "points", -1, "kib_per_connection"),
            True,
        ),
        ("churn cycles/s", lambda r, d: _get(r, "churn", "cycles_per_s"), False),
    ]
    others = [k for k in doc["results"] if k != "proxy"]
    lines = ["| metric | " + " | ".join(f"vs {SHORT.get(k, k)}" for k in others) + " |"]
    lines.append("|" + " --- |" * (len(others) + 1))
    for label, getter, invert in metrics:
        cells = [_fmt(_ratio(doc, getter, k, invert), ".2f") for k in others]
        if any(c != "—" for c in cells):
            lines.append(
                f"| {label} | " + " | ".join(f"{c}x" if c != "—" else c for c in cells) + " |"
            )
    return lines


def targets(doc: Json) -> list[Json]:
    results = doc["results"]
    mine: Json = results.get("proxy", {})
    s = doc["scale"]
    out: list[Json] = []

    def add(name: str, value: float | None, ok: Callable[[float], bool], detail: str) -> None:
        status = "N/A" if value is None else ("PASS" if ok(value) else "FAIL")
        out.append({"name": name, "value": value, "status": status, "detail": detail})

    ingest = _get(mine, "ingest", "events_per_s")
    bare = _get(results.get("grpc", {}), "ingest", "events_per_s")
    share = ingest / bare if ingest and bare else None
    add(
        "ingest >= 90% of bare grpcio",
        share,
        lambda v: v >= 0.9,
        f"{_fmt(ingest, ',.0f')} vs {_fmt(bare, ',.0f')} events/s = {_fmt(_pct(share), '.0f')}%",
    )
    add(
        "ingest >= 100,000 events/s (upstream batches of 512)",
        ingest,
        lambda v: v >= 100_000,
        f"{_fmt(ingest, ',.0f')} events/s",
    )
    fan = lambda r, d: _get(r, "fanout", "burst", "deliveries_per_s")  # noqa: E731
    for other, factor in (("aiohttp", 3.0), ("starlette", 2.0)):
        ratio = _ratio(doc, fan, other)
        add(
            f"fan-out deliveries/s >= {factor:.0f}x system {SHORT[other]}",
            ratio,
            _at_least(factor),
            f"{_fmt(ratio, '.2f')}x",
        )
    p99 = _get(mine, "fanout", "latency", "p99_ms")
    complete = bool(mine.get("fanout", {}).get("latency", {}).get("complete"))
    floor = _get(results.get("floor", {}), "fanout", "latency", "p99_ms")
    add(
        f"fan-out p99 <= 10 ms at {s['fanout_clients']:,} clients, {s['fanout_rate']:.0f} ev/s",
        p99,
        lambda v: v <= 10.0 and complete,
        f"p99 {_fmt(p99, '.1f')} ms"
        + ("" if complete or p99 is None else ", not all delivered")
        + ("" if floor is None else f" (6. send floor: {floor:.1f} ms)"),
    )
    ratio = _get(mine, "selective", "cpu_ratio_large_vs_small")
    add(
        f"CPU/event with {s['selective_users']:,} non-matching <= 1.2x with "
        f"{s['nonmatching_small']}",
        ratio,
        lambda v: v <= 1.2,
        f"{_fmt(ratio, '.2f')}x ("
        f"{_fmt(_get(mine, 'selective', 'nonmatching_large', 'cpu_us_per_event'), '.1f')} vs "
        f"{_fmt(_get(mine, 'selective', 'nonmatching_small', 'cpu_us_per_event'), '.1f')} µs)",
    )
    per_conn = _get(mine, "connections", "points", -1, "kib_per_connection")
    add(
        f"<= 32 KiB RSS per idle connection at {s['connection_counts'][-1]:,}",
        per_conn,
        lambda v: v <= 32.0,
        f"{_fmt(per_conn, '.1f')} KiB",
    )
    growth = _get(mine, "churn", "rss_growth_mib")
    add(
        f"<= 5 MiB RSS growth after {s['churn_cycles']:,} connect/disconnect cycles",
        growth,
        lambda v: v <= 5.0,
        f"{_fmt(growth, '.1f')} MiB",
    )
    storm: Json = mine.get("dashboard-storm", {})
    live_s = _get(mine, "dashboard-storm", "all_live_s")
    add(
        f"dashboard storm: all {s.get('dash_clients', 0):,} dashboards live <= 10 s",
        live_s,
        lambda v: v <= 10.0 and bool(storm.get("all_live")),
        f"{_fmt(live_s, '.2f')} s ({storm.get('live', 0)} of {storm.get('dashboards', 0)} live)",
    )
    storm_p99 = _get(mine, "dashboard-storm", "flow", "p99_ms")
    add(
        "dashboard storm: other clients' p99 <= 100 ms during it",
        storm_p99,
        lambda v: v <= 100.0 and bool(storm.get("flow", {}).get("complete")),
        f"p99 {_fmt(storm_p99, '.1f')} ms",
    )
    mixed = _get(mine, "generations", "mixed_over_one")
    add(
        "CPU/delivery with v4 and v5 clients mixed <= 1.1x v4 only",
        mixed,
        lambda v: v <= 1.1,
        f"{_fmt(mixed, '.2f')}x ("
        f"{_fmt(_get(mine, 'generations', 'mixed_us'), '.2f')} vs "
        f"{_fmt(_get(mine, 'generations', 'one_us'), '.2f')} µs, medians of "
        f"{len(mine.get('generations', {}).get('cpu_us_per_delivery', {}).get('one', []))})",
    )
    _storm_targets(doc, add)
    return out


def _storm_targets(
    doc: Json, add: Callable[[str, float | None, Callable[[float], bool], str], None]
) -> None:
    """Issue 16's: two workers re-admit a storm in at most 0.6x one's time; nothing
    lost or twice; staying clients' p99 at most 200 ms; CPU per reconnect within 1.4x
    the churn scenario's per cycle."""
    results = doc["results"]
    one, two = results.get("proxy", {}), results.get("proxy2", {})
    n = doc["scale"]["storm_clients"]
    t1, t2 = _get(one, "storm", "readmit_s"), _get(two, "storm", "readmit_s")
    ratio = t2 / t1 if t1 and t2 else None
    add(
        f"storm of {n:,}: 2 workers re-admit in <= 0.6x the time of 1",
        ratio,
        lambda v: v <= 0.6,
        f"{_fmt(t2, '.2f')} s vs {_fmt(t1, '.2f')} s = {_fmt(ratio, '.2f')}x",
    )
    measured = [r["storm"] for r in (one, two) if isinstance(r.get("storm"), dict)]
    wrong = [float(r["lost"] + r["duplicated"]) for r in measured if "lost" in r]
    add(
        "storm: 0 lost, 0 duplicated (1 and 2 workers)",
        sum(wrong) if wrong else None,
        lambda v: v == 0,
        ", ".join(f"lost {r['lost']}, twice {r['duplicated']}" for r in measured if "lost" in r)
        or "—",
    )
    p99s = [
        v
        for v in (_get(one, "storm", "staying_p99_ms"), _get(two, "storm", "staying_p99_ms"))
        if v is not None
    ]
    add(
        "storm: staying clients' p99 <= 200 ms (1 and 2 workers)",
        max(p99s) if p99s else None,
        lambda v: v <= 200.0,
        " / ".join(f"{v:.1f} ms" for v in p99s) or "—",
    )
    per = _get(one, "storm", "cpu_ms_per_reconnect")
    churn = _get(one, "churn", "cpu_us_per_cycle")
    factor = per * 1000 / churn if per is not None and churn else None
    add(
        "storm: CPU per reconnect <= 1.4x churn's per cycle (1 worker)",
        factor,
        lambda v: v <= 1.4,
        f"{_fmt(per, '.2f')} ms vs {_fmt(churn / 1000 if churn else None, '.2f')} ms = "
        f"{_fmt(factor, '.2f')}x",
    )


def main(argv: list[str] | None = None) -> int:
    """Re-render a run: ``python -m bench.report RESULTS.json [OUT_DIR]``."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0])
    out = Path(args[1]) if len(args) > 1 else source.parent
    doc = json.loads(source.read_text())
    doc["targets"] = targets(doc)
    (out / "results.md").write_text(markdown(doc))
    plot(doc, out / "benchmarks.png")
    print(markdown(doc))
    return 0


def plot(doc: Json, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict[str, Json] = doc["results"]
    systems = list(results)
    rows = _rows(doc)
    wanted = [0, 3, 5, 9, 12, len(rows) - 3, len(rows) - 2, len(rows) - 1]
    log_scale = {0, 3, 5, 9, 12}
    # The targets' thresholds, drawn as dashed lines.
    lines = {0: 100_000.0, 5: 10.0, len(rows) - 3: 32.0, len(rows) - 1: 5.0}
    colors = {
        "proxy": "#1f77b4",
        "proxy2": "#17becf",
        "aiohttp": "#ff7f0e",
        "starlette": "#2ca02c",
        "nchan": "#7f7f7f",
        "grpc": "#9467bd",
        "floor": "#bcbd22",
    }
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    for ax, index in zip(axes.flat, wanted, strict=True):
        label, getter, spec = rows[index]
        names, values, bar_colors = [], [], []
        for key in systems:
            value = getter(results.get(key, {}), doc)
            if value is not None and (value > 0 or (value == 0 and index not in log_scale)):
                names.append(SHORT.get(key, key).split(". ", 1)[-1])
                values.append(value)
                bar_colors.append(colors.get(key, "#333333"))
        ax.bar(names, values, color=bar_colors)
        ax.set_title(label, fontsize=9)
        if index in lines:
            ax.axhline(lines[index], color="#d62728", linestyle="--", linewidth=1)
        if index in log_scale and values:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for x, v in enumerate(values):
            ax.annotate(format(v, spec), (x, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(
        f"kernel-events-proxy vs peers ({doc['mode']} run, "
        f"{doc['machine'].get('cpus')} CPUs, loopback)",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
