"""The benchmark harness: every scenario against every system, one command.

    python -m bench.run [--quick | --smoke] [--systems proxy,aiohttp,...]
                        [--scenarios ingest,fanout,...] [--out bench/out] [--profile]

One upstream (``bench.upstream_driver``: the project's gRPC server over an EventLog,
fed with a fixed generated event set) feeds every system. Load generators
(``bench.loadgen``) are separate processes; on this 2-core machine the system under
test, the upstream and the load generators share the cores, so throughput is what
the system achieves while they all run, and CPU cost is read from /proc for the
system's own processes only. Writes ``results.json``, ``results.md`` and
``benchmarks.png`` under ``--out``; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from . import report
from .common import (
    EVENTS_PATH,
    STORM_GROUP,
    Json,
    cpu_seconds,
    merge_histograms,
    percentile,
    raise_fd_limit,
    write_replay_file,
)
from .procs import ROOT, Child, ChildError, call_all
from .profiling import Profiler
from .systems import SYSTEMS, Paths, ProxySystem, System

# The dashboard storm comes last: it empties the upstream's state table (its figures
# are for a state of its own sessions only), which every later proxy would load.
SCENARIOS: Final = (
    "ingest",
    "fanout",
    "selective",
    "connections",
    "churn",
    "generations",
    "storm",
    "dashboard-storm",
)
# The later API generation's path (generations.py): the generations scenario mixes it in.
V5_PATH: Final = "/events/session"
GENERATION_ROUNDS: Final = 3
# What a dashboard opens (proxy/ui/app.js), narrowed to the storm's sessions.
DASHBOARD_PATH: Final = f"{EVENTS_PATH}?group={STORM_GROUP}&withGroup=true&initialState=true"


@dataclass(frozen=True)
class Scale:
    ingest_events: int
    ingest_runs: int  # the ingest phase is repeated; its median run is reported
    fanout_clients: int
    fanout_rate: float  # events per second in the latency phase
    fanout_seconds: float
    fanout_burst: int  # events in the throughput phase (below the outbox limit, 4096)
    selective_users: int
    selective_burst: int
    nonmatching_small: int
    nonmatching_rate: float
    nonmatching_seconds: float
    connection_counts: tuple[int, ...]
    churn_cycles: int
    churn_concurrency: int
    storm_clients: int  # drop and reconnect at once, with Last-Event-ID
    storm_staying: int  # stay connected meanwhile (their latency is measured)
    storm_rate: float  # events per second throughout
    storm_lead: float  # seconds of events before the storm (the steady CPU is read)
    storm_max_seconds: float  # the longest the events may flow
    drain_timeout: float  # how long a phase may take after its last event was sent
    clients_per_loadgen: int
    settle: float  # multiplies every pause that lets a system settle before measuring
    budget: float  # seconds for the whole run; later scenarios are skipped past it
    # The dashboard storm: this many dashboards open initialState=true streams at once,
    # each seeing dash_sessions sessions, while dash_rate events/s flow to
    # dash_others other clients for dash_seconds.
    dash_clients: int = 200
    dash_sessions: int = 5000
    dash_others: int = 1000
    dash_rate: float = 100.0
    dash_seconds: float = 12.0


FULL: Final = Scale(
    ingest_events=300_000,
    ingest_runs=3,
    fanout_clients=1000,
    fanout_rate=100.0,
    fanout_seconds=10.0,
    fanout_burst=2000,
    selective_users=10_000,
    selective_burst=20_000,
    nonmatching_small=10,
    nonmatching_rate=1000.0,
    nonmatching_seconds=5.0,
    connection_counts=(1000, 10_000),
    churn_cycles=10_000,
    churn_concurrency=64,
    storm_clients=4000,
    storm_staying=500,
    storm_rate=10.0,
    storm_lead=2.0,
    storm_max_seconds=180.0,
    drain_timeout=20.0,
    clients_per_loadgen=5000,
    settle=1.0,
    budget=19 * 60,
)
QUICK: Final = Scale(
    ingest_events=100_000,
    ingest_runs=1,
    fanout_clients=200,
    fanout_rate=100.0,
    fanout_seconds=1.5,
    fanout_burst=500,
    selective_users=500,
    selective_burst=2000,
    nonmatching_small=10,
    nonmatching_rate=500.0,
    nonmatching_seconds=1.2,
    connection_counts=(200, 1000),
    churn_cycles=500,
    churn_concurrency=32,
    storm_clients=1000,
    storm_staying=100,
    storm_rate=10.0,
    storm_lead=1.0,
    storm_max_seconds=60.0,
    drain_timeout=3.0,
    clients_per_loadgen=5000,
    settle=0.25,
    budget=110,
    dash_clients=50,
    dash_sessions=2000,
    dash_others=200,
    dash_seconds=4.0,
)
SMOKE: Final = Scale(
    ingest_events=2000,
    ingest_runs=1,
    fanout_clients=5,
    fanout_rate=50.0,
    fanout_seconds=1.0,
    fanout_burst=100,
    selective_users=20,
    selective_burst=100,
    nonmatching_small=2,
    nonmatching_rate=100.0,
    nonmatching_seconds=1.0,
    connection_counts=(20, 40),
    churn_cycles=50,
    churn_concurrency=4,
    storm_clients=20,
    storm_staying=5,
    storm_rate=20.0,
    storm_lead=0.5,
    storm_max_seconds=30.0,
    drain_timeout=5.0,
    clients_per_loadgen=5000,
    settle=0.1,
    budget=120,
    dash_clients=4,
    dash_sessions=50,
    dash_others=5,
    dash_rate=50.0,
    dash_seconds=1.5,
)
MODES: Final = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


class Skipped(Exception):
    pass


class Clients:
    """The load generators of one scenario (or the gRPC drain, its own client)."""

    def __init__(self, children: list[Child], drain: bool = False) -> None:
        self.children = children
        self.drain = drain
        self.held = 0

    def connect(
        self, paths: Paths, *, which: str, start: int, count: int, track: bool = False
    ) -> float:
        """Open ``count`` streams (users ``start``..) spread over the generators;
        ``track``: each keeps which events it got (the storm's lost and duplicated)."""
        if self.drain or count <= 0:
            return 0.0
        path = paths.all_path if which == "all" else paths.user_path
        auth = paths.auth_all if which == "all" else paths.auth_user
        k = len(self.children)
        shares = [count // k + (1 if i < count % k else 0) for i in range(k)]
        cmds: list[Json] = []
        first = start
        for share in shares:
            cmds.append(
                {
                    "op": "connect",
                    "port": paths.port,
                    "path": path,
                    "auth": auth,
                    "start": first,
                    "count": share,
                    "concurrency": 100,
                    "timeout": max(60.0, count / 100),
                    "track": track,
                }
            )
            first += share
        began = time.monotonic()
        answers = call_all(self.children, cmds, timeout=max(120.0, count / 50))
        connected = sum(int(a["connected"]) for a in answers)
        self.held += connected
        if connected < count:
            raise ChildError(f"only {connected} of {count} streams connected")
        return time.monotonic() - began

    def close(self) -> None:
        if not self.drain:
            call_all(self.children, [{"op": "close"}] * len(self.children))
        self.held = 0

    def reset(self, latency: bool) -> float:
        answers = call_all(
            self.children, [{"op": "reset", "latency": latency}] * len(self.children)
        )
        return sum(float(a["cpu"]) for a in answers)

    def report(self, hist: bool = False) -> Json:
        answers = call_all(self.children, [{"op": "report", "hist": hist}] * len(self.children))
        firsts = [a["first"] for a in answers if a["first"]]
        return {
            "deliveries": sum(a["deliveries"] for a in answers),
            "overflows": sum(a["overflows"] for a in answers),
            "first": min(firsts) if firsts else 0.0,
            "last": max(a["last"] for a in answers),
            "lost": sum(a["lost"] for a in answers),
            "cpu": sum(a["cpu"] for a in answers),
            "hist": merge_histograms(a.get("hist", {}) for a in answers),
        }

    def storm(self, timeout: float) -> Json:
        """Every stream drops and reconnects at once (all generators together)."""
        cmd: Json = {"op": "storm", "timeout": timeout}
        answers = call_all(self.children, [cmd] * len(self.children), timeout=timeout + 30)
        dropped = min(float(a["dropped_at"]) for a in answers)
        after = sorted(float(t) - dropped for a in answers for t in a["admitted"])
        return {
            "admitted_after_s": {  # how long clients waited, from the drop
                f"p{q}": after[min(len(after) - 1, len(after) * q // 100)] if after else None
                for q in (10, 50, 90, 99)
            },
            "dropped_at": dropped,
            "readmitted_at": max(float(a["readmitted_at"]) for a in answers),
            "reconnected": sum(int(a["reconnected"]) for a in answers),
            "failed": sum(int(a["failed"]) for a in answers),
        }

    def tally(self, count: int) -> Json:
        answers = call_all(self.children, [{"op": "tally", "count": count}] * len(self.children))
        out: Json = {}
        for key in answers[0]:
            values = [int(a[key]) for a in answers]
            out[key] = max(values) if key.endswith("_max") else sum(values)
        return out

    def dashboards(self, paths: Paths, count: int, timeout: float) -> Json:
        """Open ``count`` dashboards at once, spread over the generators; wait until
        each is live (its state has ended) or ``timeout``."""
        k = len(self.children)
        shares = [count // k + (1 if i < count % k else 0) for i in range(k)]
        starts = [sum(shares[:i]) for i in range(k)]
        cmds: list[Json] = [
            {"op": "dashboards", "port": paths.port, "path": paths.all_path,
             "auth": paths.auth_all, "start": start, "count": share, "timeout": timeout}
            for start, share in zip(starts, shares, strict=True)
        ]  # fmt: skip
        answers = call_all(self.children, cmds, timeout=timeout + 60)
        self.held += sum(int(a["connected"]) for a in answers)
        return {
            "connected": sum(int(a["connected"]) for a in answers),
            "live": sum(int(a["live"]) for a in answers),
            "seconds": sorted(t for a in answers for t in a["seconds"]),
            "state_bytes": sorted(b for a in answers for b in a["state_bytes"]),
        }

    def stop(self) -> None:
        if not self.drain:
            for child in self.children:
                child.stop()


class Bench:
    def __init__(
        self, scale: Scale, mode: str, out: Path, profile: bool, native: bool = False
    ) -> None:
        self.scale = scale
        self.mode = mode
        self.out = out
        self.work = out / "work"
        self.logs = self.work / "logs"
        self.started = time.monotonic()
        self.profiler = Profiler(out / "profiles", native) if profile or native else None
        self.driver: Child | None = None
        self.results: dict[str, Json] = {}
        self.notes: list[str] = []
        self.machine = machine()

    # -- processes -------------------------------------------------------------------

    def start_upstream(self) -> str:
        replay = write_replay_file(
            self.work / f"ingest-{self.scale.ingest_events}.jsonl", self.scale.ingest_events
        )
        self.driver = Child(
            "upstream",
            [
                sys.executable,
                "-m",
                "bench.upstream_driver",
                "--listen",
                "127.0.0.1:0",
                "--replay",
                str(replay),
            ],
            self.logs,
        )
        hello = self.driver.expect(120)
        return str(hello["target"])

    def clients(self, system: System, connections: int, name: str = "loadgen") -> Clients:
        if system.key == "grpc":
            return Clients(system.procs[:1], drain=True)
        k = max(1, math.ceil(connections / self.scale.clients_per_loadgen))
        argv = [sys.executable, "-m", "bench.loadgen"]
        return Clients([Child(f"{name}-{system.key}-{i}", argv, self.logs) for i in range(k)])

    def pause(self, seconds: float) -> None:
        time.sleep(seconds * self.scale.settle)

    def remaining(self) -> float:
        return self.scale.budget - (time.monotonic() - self.started)

    # -- one measured phase ------------------------------------------------------------

    @contextmanager
    def profiled(self, system: System, name: str) -> Iterator[None]:
        """With ``--profile``: py-spy records this proxy (only) while the block runs."""
        if self.profiler is None or system.key != "proxy":
            yield
            return
        self.profiler.start(system.pids()[0], f"{self.mode}-{name}")
        try:
            yield
        finally:
            self.profiler.stop()

    def phase(
        self,
        name: str,
        system: System,
        clients: Clients,
        send: Json,
        *,
        expected: int,
        per_event: int,
        send_seconds: float,
        latency: bool = False,
        during: Callable[[], None] | None = None,
    ) -> Json:
        """Send events, wait until every client got what it should (or time is up).

        ``during``: run once the send has begun (what the phase measures clients under).
        """
        assert self.driver is not None
        lg0 = clients.reset(latency)
        cpu0, t0 = system.cpu(), time.time()
        with self.profiled(system, name):
            self.driver.call(send)
            if during is not None:
                during()
            deadline = t0 + send_seconds + self.scale.drain_timeout
            state = clients.report()
            while state["deliveries"] < expected and time.time() < deadline:
                time.sleep(0.1)
                state = clients.report()
            t1, cpu1 = time.time(), system.cpu()
        sent = self.driver.call({"op": "wait", "timeout": 60}, 90)
        final = clients.report(hist=latency)
        delivered = int(final["deliveries"])
        elapsed = (final["last"] - sent["first"]) if delivered else (t1 - t0)
        cpu = cpu1 - cpu0
        events_done = delivered / per_event if per_event else 0.0
        out: Json = {
            "events_sent": sent["count"],
            "expected": expected,
            "delivered": delivered,
            "complete": delivered >= expected,
            "overflows": final["overflows"],
            "lost_connections": final["lost"],
            "send_seconds": sent["last"] - sent["first"],
            "elapsed": elapsed,
            "deliveries_per_s": delivered / elapsed if elapsed > 0 else 0.0,
            "events_per_s": events_done / elapsed if elapsed > 0 else 0.0,
            "sut_cpu_s": cpu,
            "sut_cpu_util": cpu / (t1 - t0),
            "cpu_us_per_event": cpu / events_done * 1e6 if events_done else None,
            "cpu_us_per_delivery": cpu / delivered * 1e6 if delivered else None,
            "loadgen_cpu_util": (final["cpu"] - lg0) / (t1 - t0),
        }
        if latency:
            hist = final["hist"]
            for q, key in ((0.5, "p50_ms"), (0.99, "p99_ms"), (0.999, "p999_ms")):
                value = percentile(hist, q)
                out[key] = value * 1e3 if value is not None else None
        log(
            f"  {name}: {delivered}/{expected} delivered in {elapsed:.2f}s "
            f"({out['deliveries_per_s']:,.0f}/s), SUT CPU {cpu:.2f}s"
            + (f", p99 {out.get('p99_ms') or 0:.1f} ms" if latency else "")
        )
        return out

    def idle_cpu(self, system: System, seconds: float) -> float:
        cpu0, t0 = system.cpu(), time.monotonic()
        time.sleep(seconds)
        return (system.cpu() - cpu0) / (time.monotonic() - t0)

    # -- scenarios -------------------------------------------------------------------

    def ingest(self, system: System) -> Json:
        """As fast as it goes (batches of 512), ``ingest_runs`` times, then paced (one
        event per message). The median run by rate is the result: one run's rate moves
        by 10 % or more with what else the two cores happen to be doing, for every
        system alike."""
        s = self.scale
        n = s.ingest_events
        paths = system.start(users=0, route="all")
        clients = self.clients(system, 1)
        try:
            clients.connect(paths, which="all", start=0, count=1)
            self.pause(0.3)
            runs: list[Json] = []
            for i in range(s.ingest_runs):
                assert self.driver is not None
                self.driver.call({"op": "trim"})  # each run starts from the same upstream
                run = self.phase(
                    "ingest" if s.ingest_runs == 1 else f"ingest-{i + 1}",
                    system,
                    clients,
                    {"op": "ingest", "count": n},
                    expected=n,
                    per_event=1,
                    send_seconds=max(10.0, n / 20_000),
                )
                runs.append(run)
                if not run["complete"]:
                    break
            if runs[-1]["complete"]:
                ranked = sorted(runs, key=lambda r: float(r["events_per_s"]))
                result = dict(ranked[len(ranked) // 2])
            else:  # a run that did not finish is the result: it is not hidden by others
                result = dict(runs[-1])
            result["runs_events_per_s"] = [r["events_per_s"] for r in runs]
            if not runs[-1]["complete"]:
                paths = self.restart(system, clients, users=0, route="all", which="all", count=1)
            count = int(s.nonmatching_rate * s.nonmatching_seconds)
            result["paced"] = self.phase(
                "ingest-paced",
                system,
                clients,
                {"op": "send", "kind": "all", "count": count, "rate": s.nonmatching_rate},
                expected=count,
                per_event=1,
                send_seconds=s.nonmatching_seconds,
            )
        finally:
            clients.stop()
        return result

    def fanout(self, system: System) -> Json:
        s = self.scale
        n = s.fanout_clients
        paths = system.start(users=0, route="all")
        clients = self.clients(system, n)
        try:
            connect_s = clients.connect(paths, which="all", start=0, count=n)
            self.pause(1.0)
            lat = self.paced(
                "fanout-latency", system, clients, n, s.fanout_rate, s.fanout_seconds, latency=True
            )
            if not lat["complete"]:
                paths = self.restart(system, clients, users=0, route="all", which="all", count=n)
            burst = self.burst("fanout-burst", system, clients, n)
        finally:
            clients.stop()
        return {"clients": n, "connect_s": connect_s, "latency": lat, "burst": burst}

    def paced(
        self,
        name: str,
        system: System,
        clients: Clients,
        n: int,
        rate: float,
        seconds: float,
        *,
        latency: bool = False,
        during: Callable[[], None] | None = None,
    ) -> Json:
        """A paced phase: ``rate`` events/s for ``seconds``, one per message, to ``n``
        clients that all see every event."""
        count = int(rate * seconds)
        return self.phase(
            name,
            system,
            clients,
            {"op": "send", "kind": "all", "count": count, "rate": rate},
            expected=count * n,
            per_event=n,
            send_seconds=seconds,
            latency=latency,
            during=during,
        )

    def burst(self, name: str, system: System, clients: Clients, n: int) -> Json:
        """The throughput phase: ``fanout_burst`` events as fast as possible to ``n``."""
        s = self.scale
        return self.phase(
            name,
            system,
            clients,
            {"op": "send", "kind": "all", "count": s.fanout_burst, "rate": 0},
            expected=s.fanout_burst * n,
            per_event=n,
            send_seconds=1.0,
        )

    def generations(self, system: System) -> Json:
        """CPU per delivery of the fan-out latency phase (paced events, one write per
        client and event: the per-delivery path) to v4 clients only, and to half v4,
        half v5 (``/events/session``) clients: each event is encoded once per
        generation, so mixing them must cost little. Rounds alternate, so the shared
        machine's drift falls on both alike; the medians are compared."""
        s = self.scale
        n = s.fanout_clients
        v4 = system.start(users=0, route="all")
        v5 = replace(v4, all_path=V5_PATH)
        clients = self.clients(system, n)
        per: dict[str, list[float]] = {"one": [], "mixed": []}
        seconds = min(s.fanout_seconds, 4.0)
        try:
            for _ in range(GENERATION_ROUNDS):
                for mode in per:
                    half = n // 2 if mode == "mixed" else n
                    clients.connect(v4, which="all", start=0, count=half)
                    clients.connect(v5, which="all", start=half, count=n - half)
                    self.pause(0.5)
                    paced = self.paced(
                        f"generations-{mode}", system, clients, n, s.fanout_rate, seconds
                    )
                    clients.close()
                    if paced["complete"] and paced["cpu_us_per_delivery"] is not None:
                        per[mode].append(paced["cpu_us_per_delivery"])
        finally:
            clients.stop()
        one = statistics.median(per["one"]) if per["one"] else None
        mixed = statistics.median(per["mixed"]) if per["mixed"] else None
        ratio = mixed / one if one and mixed else None
        log(f"  generations: CPU/delivery one {one} µs, mixed {mixed} µs, ratio {ratio}")
        return {
            "clients": n,
            "cpu_us_per_delivery": per,
            "one_us": one,
            "mixed_us": mixed,
            "mixed_over_one": ratio,
        }

    def selective(self, system: System) -> Json:
        s = self.scale
        users = s.selective_users + 1  # user 0 matches; the others are the non-matching
        paths = system.start(users=users, route="owner")
        clients = self.clients(system, users)
        nm_count = int(s.nonmatching_rate * s.nonmatching_seconds)
        nm_send: Json = {
            "op": "send",
            "kind": "one",
            "count": nm_count,
            "rate": s.nonmatching_rate,
        }
        try:
            small = s.nonmatching_small
            clients.connect(paths, which="user", start=0, count=small + 1)
            self.pause(1.0)
            idle_small = self.idle_cpu(system, 3.0 * self.scale.settle)
            nm_small = self.phase(
                f"nonmatching-{small}",
                system,
                clients,
                nm_send,
                expected=nm_count,
                per_event=1,
                send_seconds=s.nonmatching_seconds,
            )
            connect_s = clients.connect(
                paths, which="user", start=small + 1, count=users - small - 1
            )
            self.pause(2.0)
            idle_large = self.idle_cpu(system, 3.0 * self.scale.settle)
            nm_large = self.phase(
                f"nonmatching-{users - 1}",
                system,
                clients,
                nm_send,
                expected=nm_count,
                per_event=1,
                send_seconds=s.nonmatching_seconds,
            )
            if not nm_large["complete"]:
                paths = self.restart(
                    system, clients, users=users, route="owner", which="user", count=users
                )
            spread = self.phase(
                "selective-spread",
                system,
                clients,
                {
                    "op": "send",
                    "kind": "users",
                    "count": s.selective_burst,
                    "rate": 0,
                    "users": users,
                },
                expected=s.selective_burst,
                per_event=1,
                send_seconds=1.0,
            )
        finally:
            clients.stop()
        for phase_result, idle in ((nm_small, idle_small), (nm_large, idle_large)):
            phase_result["idle_cpu_util"] = idle
            done = phase_result["delivered"]
            net = phase_result["sut_cpu_s"] - idle * phase_result["elapsed"]
            phase_result["cpu_us_per_event_net_of_idle"] = net / done * 1e6 if done else None
        small_cpu, large_cpu = nm_small["cpu_us_per_event"], nm_large["cpu_us_per_event"]
        return {
            "users": users,
            "connect_s": connect_s,
            "spread": spread,
            "nonmatching_small": {"clients": s.nonmatching_small, **nm_small},
            "nonmatching_large": {"clients": users - 1, **nm_large},
            "cpu_ratio_large_vs_small": (
                large_cpu / small_cpu if small_cpu and large_cpu else None
            ),
        }

    def connections(self, system: System) -> Json:
        counts = self.scale.connection_counts
        paths = system.start(users=0, route="all")
        clients = self.clients(system, max(counts) + 10)
        points: list[Json] = []
        try:
            clients.connect(paths, which="all", start=0, count=10)  # warm-up
            self.pause(1.0)
            base = system.rss()
            held = 0
            for n in counts:
                seconds = clients.connect(paths, which="all", start=10 + held, count=n - held)
                connect_rate = (n - held) / seconds if seconds else 0.0
                held = n
                self.pause(2.0 if n < 5000 else 4.0)
                rss = system.rss()
                points.append(
                    {
                        "connections": n,
                        "rss_kib": rss,
                        "kib_per_connection": (rss - base) / n,
                        "connects_per_s": connect_rate,
                    }
                )
                log(f"  {n} idle: RSS {rss / 1024:.1f} MiB, {(rss - base) / n:.1f} KiB each")
        finally:
            clients.stop()
        return {"baseline_rss_kib": base, "points": points}

    def churn(self, system: System) -> Json:
        s = self.scale
        paths = system.start(users=0, route="all")
        clients = self.clients(system, s.churn_concurrency)
        cmd: Json = {
            "op": "churn",
            "port": paths.port,
            "path": paths.all_path,
            "auth": paths.auth_all,
            "concurrency": s.churn_concurrency,
        }
        gen = clients.children[0]
        try:
            gen.call(cmd | {"cycles": min(200, s.churn_cycles), "timeout": 30}, 60)  # warm-up
            self.pause(1.0)
            rss0, cpu0 = system.rss(), system.cpu()
            timeout = max(60.0, min(240.0, self.remaining() - 30))
            with self.profiled(system, "churn"):
                answer = gen.call(
                    cmd | {"cycles": s.churn_cycles, "timeout": timeout}, timeout + 30
                )
            cpu = system.cpu() - cpu0
            self.pause(2.0)
            rss1 = system.rss()
        finally:
            clients.stop()
        cycles = int(answer["cycles"])
        out: Json = {
            "cycles": cycles,
            "failed": answer["failed"],
            "elapsed": answer["elapsed"],
            "cycles_per_s": cycles / answer["elapsed"] if answer["elapsed"] else 0.0,
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "rss_growth_mib": (rss1 - rss0) / 1024,
            "cpu_us_per_cycle": cpu / cycles * 1e6 if cycles else None,
        }
        log(
            f"  churn: {cycles} cycles ({answer['failed']} failed) "
            f"at {out['cycles_per_s']:,.0f}/s, "
            f"RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB"
        )
        return out

    def storm(self, system: System) -> Json:
        """``storm_clients`` drop and reconnect at once with ``Last-Event-ID`` (a replica
        died; its clients land here) while events flow to ``storm_staying`` clients.
        Measured: the time until every one is admitted again, the system's CPU for it
        (net of what the flow costs, read just before), the staying clients' latency
        during it, and per client the events lost or received twice by the end."""
        s = self.scale
        n, m = s.storm_clients, s.storm_staying
        paths = system.start(users=0, route="all")
        staying = self.clients(system, m)
        storming = self.clients(system, n)
        assert self.driver is not None
        try:
            staying.connect(paths, which="all", start=0, count=m, track=True)
            storming.connect(paths, which="all", start=m, count=n, track=True)
            self.pause(1.0)
            flow: Json = {
                "op": "send",
                "kind": "all",
                "count": int(s.storm_rate * s.storm_max_seconds),
                "rate": s.storm_rate,
            }
            self.driver.call(flow)
            time.sleep(s.storm_lead / 2)
            cpu0, t0 = system.cpu(), time.monotonic()
            time.sleep(s.storm_lead / 2)
            cpu1, t1 = system.cpu(), time.monotonic()
            steady = (cpu1 - cpu0) / (t1 - t0)
            staying.reset(latency=True)
            pids = system.pids()  # a supervisor's and its workers' apart, too
            before = [cpu_seconds(pid) for pid in pids]
            lg0 = storming.report()["cpu"] + staying.report()["cpu"]
            with self.profiled(system, "storm"):
                storm = storming.storm(timeout=max(60.0, n / 50))
            cpu2, t2 = system.cpu(), time.monotonic()
            by_process = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
            lg1 = storming.report()["cpu"] + staying.report()["cpu"]
            during = staying.report(hist=True)
            self.pause(1.0)
            self.driver.call({"op": "stop"})
            sent = int(self.driver.call({"op": "wait", "timeout": 60}, 90)["count"])
            deadline = time.monotonic() + s.drain_timeout
            while True:  # until every client has the last event (or time is up)
                stormed, stayed = storming.tally(sent), staying.tally(sent)
                done = stormed["have_last"] + stayed["have_last"] == n + m
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            staying.stop()
            storming.stop()
        readmit = storm["readmitted_at"] - storm["dropped_at"]
        cpu = cpu2 - cpu1
        net = cpu - steady * (t2 - t1)
        out: Json = {
            "clients": n,
            "staying": m,
            "events_sent": sent,
            "reconnected": storm["reconnected"],
            "failed": storm["failed"],
            "readmit_s": readmit,
            "admitted_after_s": storm["admitted_after_s"],
            "sut_cpu_s": cpu,
            "sut_cpu_s_by_process": by_process,
            "loadgen_cpu_util": (lg1 - lg0) / (t2 - t1),
            "steady_cpu_util": steady,
            # Everything the system did meanwhile, the flow to every client included (as
            # issue 16 measured it), and net of the flow's rate just before the storm
            # (an underestimate: during the storm fewer clients are there to feed).
            "cpu_ms_per_reconnect": cpu / n * 1e3 if n else None,
            "cpu_ms_per_reconnect_net": net / n * 1e3 if n else None,
            "staying_deliveries": during["deliveries"],
            "storming": stormed,
            "staying_tally": stayed,
            "lost": stormed["lost"] + stayed["lost"],
            "duplicated": stormed["duplicated"] + stayed["duplicated"],
        }
        hist = during["hist"]
        for q, key in ((0.5, "staying_p50_ms"), (0.99, "staying_p99_ms")):
            value = percentile(hist, q)
            out[key] = value * 1e3 if value is not None else None
        log(
            f"  storm: {storm['reconnected']}/{n} re-admitted in {readmit:.2f}s, "
            f"CPU {cpu:.2f}s ({out['cpu_ms_per_reconnect'] or 0:.2f} ms each, "
            f"{out['cpu_ms_per_reconnect_net'] or 0:.2f} net of the flow), staying "
            f"p99 {out['staying_p99_ms'] or 0:.1f} ms, lost {out['lost']}, "
            f"duplicated {out['duplicated']}"
        )
        return out

    def dashboard_storm(self, system: System) -> Json:
        """``dash_clients`` dashboards (initialState=true, the page's own query) open
        at once, each seeing the ``dash_sessions`` sessions of the upstream's state,
        while ``dash_rate`` events/s flow to ``dash_others`` other clients: the time
        until every dashboard is live (its state has ended), the other clients' latency
        meanwhile, the state's bytes per dashboard, and RSS per session held (a proxy
        started with that state against one started with none, both before any
        client)."""
        s = self.scale
        assert self.driver is not None
        self.driver.call({"op": "clear_state"})
        if isinstance(system, ProxySystem):
            system.keep_state = True  # held from start-up, so its RSS can be read
        system.start(users=0, route="all")
        self.pause(1.0)
        empty = system.rss()
        system.stop()
        self.driver.call({"op": "populate", "count": s.dash_sessions}, 120)
        paths = system.start(users=0, route="all")  # loads the state: its snapshot
        self.pause(1.0)
        loaded = system.rss()
        others = self.clients(system, s.dash_others)
        dashboards = self.clients(system, s.dash_clients, name="dashboards")
        storm: Json = {}
        timeout = s.dash_seconds + s.drain_timeout

        def open_dashboards() -> None:
            time.sleep(min(0.5, s.dash_seconds / 4))  # the flow is on: then the storm
            storm.update(
                dashboards.dashboards(
                    replace(paths, all_path=DASHBOARD_PATH), s.dash_clients, timeout
                )
            )

        try:
            others.connect(paths, which="all", start=0, count=s.dash_others)
            self.pause(1.0)
            flow = self.paced("dashboard-storm", system, others, s.dash_others, s.dash_rate,
                              s.dash_seconds, latency=True, during=open_dashboards)  # fmt: skip
        finally:
            dashboards.stop()
            others.stop()
        seconds, sizes = storm["seconds"], storm["state_bytes"]
        out: Json = {
            "dashboards": s.dash_clients,
            "sessions": s.dash_sessions,
            "others": s.dash_others,
            "connected": storm["connected"],
            "live": storm["live"],
            "all_live": storm["live"] == s.dash_clients,
            "all_live_s": max(seconds) if seconds else None,
            "median_live_s": statistics.median(seconds) if seconds else None,
            "state_bytes_per_dashboard": statistics.median(sizes) if sizes else None,
            "rss_empty_kib": empty,
            "rss_loaded_kib": loaded,
            "kib_per_session": (loaded - empty) / s.dash_sessions,
            "flow": flow,
        }
        log(
            f"  dashboard-storm: {storm['live']}/{s.dash_clients} live, the last after "
            f"{out['all_live_s'] or 0:.2f}s; others' p99 {flow.get('p99_ms') or 0:.1f} ms; "
            f"{(out['state_bytes_per_dashboard'] or 0) / 1024:.0f} KiB of state each; "
            f"{out['kib_per_session']:.2f} KiB RSS per session"
        )
        return out

    def restart(
        self, system: System, clients: Clients, *, users: int, route: str, which: str, count: int
    ) -> Paths:
        """A phase left a backlog (unbounded queues): start clean for the next one."""
        log(f"  {system.key} still has a backlog: restarting it and reconnecting {count}")
        clients.close()
        system.stop()
        paths = system.start(users=users, route=route)
        if clients.drain:
            clients.children = system.procs[:1]
        clients.connect(paths, which=which, start=0, count=count)
        self.pause(1.0)
        return paths

    # -- the whole run ---------------------------------------------------------------

    def run(self, systems: Sequence[str], scenarios: Sequence[str]) -> Json:
        upstream = self.start_upstream()
        log(f"upstream ready ({time.monotonic() - self.started:.1f}s)")
        runners: dict[str, Callable[[System], Json]] = {
            "ingest": self.ingest,
            "fanout": self.fanout,
            "selective": self.selective,
            "connections": self.connections,
            "churn": self.churn,
            "generations": self.generations,
            "storm": self.storm,
            "dashboard-storm": self.dashboard_storm,
        }
        try:
            for key in systems:
                cls = SYSTEMS[key]
                self.results[key] = {}
                why = cls.missing()
                if why:
                    self.results[key]["skipped"] = why
                    log(f"{key}: skipped ({why})")
                    continue
                for scenario in scenarios:
                    if scenario not in cls.scenarios:
                        continue
                    if self.remaining() < 10:
                        self.results[key][scenario] = {"skipped": "time budget exhausted"}
                        self.notes.append(f"{key}/{scenario} skipped: time budget exhausted")
                        continue
                    system = cls(self.work, upstream)
                    log(f"{key}: {scenario}")
                    assert self.driver is not None
                    self.driver.call({"op": "trim"})  # the same, empty upstream log for all
                    began = time.monotonic()
                    version = proxy_sources_digest() if key.startswith("proxy") else None
                    try:
                        self.results[key][scenario] = runners[scenario](system)
                        self.results[key][scenario]["duration_s"] = time.monotonic() - began
                        if version:
                            self.results[key][scenario]["proxy_sources_sha256"] = version
                    except (ChildError, OSError, KeyError, ValueError) as exc:
                        self.results[key][scenario] = {"error": str(exc)}
                        self.notes.append(f"{key}/{scenario} failed: {exc}")
                        log(f"  error: {exc}")
                    finally:
                        system.stop()
                        log(f"  ({time.monotonic() - began:.1f}s)")
        finally:
            if self.driver is not None:
                self.driver.stop()
        return self.document(systems)

    def document(self, systems: Sequence[str]) -> Json:
        return {
            "mode": self.mode,
            "scale": asdict(self.scale),
            "elapsed_s": time.monotonic() - self.started,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": self.machine,
            "systems": {
                key: {
                    "label": SYSTEMS[key].label,
                    "auth": SYSTEMS[key].auth,
                    "filtering": SYSTEMS[key].filtering,
                }
                for key in systems
            },
            "results": self.results,
            "notes": self.notes,
            "profiles": self.profiler.summaries if self.profiler else {},
        }


def proxy_sources_digest() -> str:
    """Which proxy was measured: a digest of its sources (the tree may be uncommitted)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def machine() -> Json:
    info: dict[str, Any] = {
        "cpus": _cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "proxy_sources_sha256_at_start": proxy_sources_digest(),
        "load_average_at_start": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _cpu_count() -> int:
    return os.cpu_count() or 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def override(scale: Scale, assignments: Sequence[str]) -> Scale:
    """``scale`` with ``FIELD=VALUE`` assignments applied, each converted to the
    field's type (a tuple field takes comma-separated values)."""
    known = {f.name: f for f in fields(Scale)}
    changes: dict[str, object] = {}
    for item in assignments:
        name, sep, text = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, FIELD one of {sorted(known)}")
        current = getattr(scale, name)
        try:
            if isinstance(current, tuple):
                changes[name] = tuple(type(current[0])(v) for v in text.split(",") if v)
            else:
                changes[name] = type(current)(text)
        except ValueError:
            raise ValueError(
                f"--set {item!r}: {text!r} is not a {type(current).__name__}"
            ) from None
    return replace(scale, **changes)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--budget", type=float, help="seconds for the whole run")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one field of the scale (e.g. storm_clients=2000); repeatable",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record this proxy with py-spy during every phase (slows it down a little)",
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="as --profile, with C frames (shows garbage collection, socket calls)",
    )
    args = parser.parse_args(argv)
    mode_name = args.mode or "full"
    scale = MODES[mode_name]
    if args.budget:
        scale = replace(scale, budget=args.budget)
    try:
        scale = override(scale, args.set)
    except ValueError as exc:
        parser.error(str(exc))
    systems = [s for s in args.systems.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS)) + sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown system or scenario: {', '.join(unknown)}")
    # Absolute: paths under it go into configuration files (nginx resolves relative
    # ones against its own prefix).
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    bench = Bench(scale, mode_name, args.out, args.profile, args.profile_native)
    doc = bench.run(systems, scenarios)
    doc["targets"] = report.targets(doc)
    (args.out / "results.json").write_text(json.dumps(doc, indent=2))
    table = report.markdown(doc)
    (args.out / "results.md").write_text(table)
    print(table)
    if not args.no_plot:
        png = report.plot(doc, args.out / "benchmarks.png")
        log(f"plot: {png}" if png else "plot: matplotlib is not installed, skipped")
    log(f"results: {args.out / 'results.json'} ({doc['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
