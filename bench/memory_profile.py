"""Where an idle stream's memory goes: tracemalloc around this proxy, in-process.

    python -m bench.memory_profile [--connections 2000] [--out bench/out]

Runs the proxy (``proxy.server.run_proxy``) in this process with tracemalloc on, the
benchmark upstream and a load generator as separate processes on loopback, opens N
idle signed streams, and reports the Python allocations that those streams added,
per connection, by package and by allocation site. What tracemalloc does not see
(the kernel's socket buffers, allocator overhead and fragmentation) is the
difference from the RSS growth, also reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import trio

from proxy.config import Settings
from proxy.server import RunningProxy, run_proxy

from .common import EVENTS_PATH, SUPER_KEY, SUPER_SECRET, Json, raise_fd_limit, rss_kib
from .procs import ROOT, Child
from .profiling import package
from .systems import proxy_limits


def _settings(target: str) -> Settings:
    return Settings.model_validate(
        {
            "server": {"bind": "127.0.0.1:0"},
            "upstream": {"target": target},
            **({"limits": proxy_limits()} if proxy_limits() else {}),
            "keypairs": [
                {
                    "access_key": SUPER_KEY,
                    "secret_key": SUPER_SECRET,
                    "role": "superadmin",
                    "user_id": "bench-super",
                    "domain": "default",
                }
            ],
        }
    )


async def _measure(target: str, n: int, logs: Path, frames: int) -> Json:
    async with trio.open_nursery() as nursery:
        running: RunningProxy = await nursery.start(run_proxy, _settings(target))
        for _ in range(600):  # the upstream is attached within seconds
            if running.bridge.live:
                break
            await trio.sleep(0.05)
        port = int(running.url.rsplit(":", 1)[1])
        gen = Child("memory-loadgen", [sys.executable, "-m", "bench.loadgen"], logs)
        base_cmd: Json = {"op": "connect", "port": port, "path": EVENTS_PATH, "auth": "super"}
        try:
            await trio.to_thread.run_sync(gen.call, base_cmd | {"start": 0, "count": 10})
            await trio.sleep(1.0)
            gc.collect()
            before, rss0 = tracemalloc.take_snapshot(), rss_kib(os.getpid())
            answer = await trio.to_thread.run_sync(
                gen.call, base_cmd | {"start": 10, "count": n}, 300.0
            )
            await trio.sleep(2.0)
            clients = running.hub.clients
            gc.collect()
            after, rss1 = tracemalloc.take_snapshot(), rss_kib(os.getpid())
        finally:
            gen.stop()
            running.shutdown()
    by_package: dict[str, float] = {}
    total = 0.0
    for stat in after.compare_to(before, "filename"):
        name = package(f"x ({stat.traceback[0].filename})")
        by_package[name] = by_package.get(name, 0.0) + stat.size_diff
        total += stat.size_diff
    sites = [
        {
            "site": f"{stat.traceback[0].filename.split('site-packages/')[-1]}:"
            f"{stat.traceback[0].lineno}",
            "bytes_per_connection": stat.size_diff / n,
            "blocks_per_connection": stat.count_diff / n,
        }
        for stat in after.compare_to(before, "lineno")[:20]
    ]
    # With deeper tracebacks (--frames): whose code asked, the innermost frame of this
    # project (or "-" for none), so trio's and hypercorn's allocations are charged to
    # the line of ours that caused them.
    by_caller: dict[str, float] = {}
    if frames > 1:
        for stat in after.compare_to(before, "traceback"):
            ours = [f for f in stat.traceback if "/proxy/" in f.filename]
            where = (
                f"{ours[-1].filename.rsplit('/proxy/', 1)[-1]}:{ours[-1].lineno}" if ours else "-"
            )
            by_caller[where] = by_caller.get(where, 0.0) + stat.size_diff
    callers = sorted(by_caller.items(), key=lambda kv: -kv[1])
    ranked = sorted(by_package.items(), key=lambda kv: -kv[1])
    if answer["connected"] != n or clients < n:
        raise RuntimeError(f"{answer['connected']} of {n} connected, hub has {clients}")
    return {
        "connections": n,
        "rss_kib_per_connection": (rss1 - rss0) / n,
        "traced_kib_per_connection": total / n / 1024,
        "by_package_kib_per_connection": [[k, round(v / n / 1024, 2)] for k, v in ranked[:15]],
        "top_sites": sites,
        "by_caller_kib_per_connection": [[k, round(v / n / 1024, 2)] for k, v in callers[:25]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--frames",
        type=int,
        default=1,
        help="traceback depth; above 1 also charges each allocation to this project's "
        "innermost line that led to it (slower)",
    )
    args = parser.parse_args()
    raise_fd_limit()
    logs = args.out / "work" / "logs"
    upstream = Child("memory-upstream", [sys.executable, "-m", "bench.upstream_driver"], logs)
    try:
        target = str(upstream.expect(60)["target"])
        tracemalloc.start(args.frames)
        result = trio.run(_measure, target, args.connections, logs, args.frames)
    finally:
        upstream.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=2))
    print(f"{result['connections']} idle streams, per connection:")
    print(f"  RSS growth {result['rss_kib_per_connection']:.1f} KiB (tracemalloc on)")
    print(f"  Python allocations {result['traced_kib_per_connection']:.1f} KiB, by package:")
    for name, kib in result["by_package_kib_per_connection"]:
        print(f"    {kib:7.2f} KiB  {name}")
    print("  top allocation sites:")
    site: dict[str, Any]
    for site in result["top_sites"][:12]:
        print(
            f"    {site['bytes_per_connection'] / 1024:7.2f} KiB "
            f"{site['blocks_per_connection']:5.1f} blocks  {site['site']}"
        )
    if result["by_caller_kib_per_connection"]:
        print("  by this project's innermost line that led to it:")
        for where, kib in result["by_caller_kib_per_connection"]:
            print(f"    {kib:7.2f} KiB  {where}")


if __name__ == "__main__":
    main()
