"""In-process microbenchmark of the ingest path: decode -> UpstreamBridge._apply -> Hub.

    python -m bench.micro_ingest [--events sim|replay] [--batches 100] [--repeat 7]
                                 [--profile] [--floor]

Builds SubscribeResponses of 512 events each (``sim``: the simulator's sessions,
owners, users, uuid kernel ids and reasons, half of them ``t=<time>`` as the
benchmark's ``send`` stamps them; ``replay``: the harness's ingest file), with
upstream timestamps, and serialises them. Then it times, in CPU time of this thread
(the machine may be busy with other work), decoding each one and applying it to a
real ``Hub`` with one superadmin subscriber, as the Trio thread does. Each repetition
starts a fresh bridge and hub (the sequencer would drop a replayed batch as
duplicates); it prints the median µs per event, total and split into decode and
apply. No network, no Trio scheduling: only the per-event CPU of the path itself.

``--floor`` also times the least any Python code can do for the same output: one
inlined loop that reads each event's fields, builds its JSON and its SSE frame, and
keeps it in a history list and one client's list; no policy, no index, no checks
beyond what the frames need. It first checks that its frames equal the hub's, byte
for byte, so it is the same work and not less. What the proxy spends above it is
structure (calls, the index, the checks); the floor itself is what no restructuring
in Python can remove (docs/benchmarks.md, "ingest >= 90 % of bare grpcio").
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from bench.common import ingest_line
from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.config import UpstreamSettings
from proxy.eventid import id_prefix
from proxy.events import _RESULT_BY_ENUM, _TERMINATION_SUFFIXES
from proxy.hub import Hub
from proxy.policy import Filters, Principal, Role
from proxy.replay import parse_line
from proxy.simulator import Simulator
from proxy.upstream import UpstreamBridge

HISTORY = 10_000  # the hub's history here, and the floor's
BATCH = 512  # what the shipped upstream and the benchmark send per response
LOG_ID = "2f1c0b7e4a9d4c3e8b6a5f0e1d2c3b4a"
SUPER = Principal("AKBENCHSUPER", Role.SUPERADMIN, "bench-super", "default")


def build_batches(count: int, seed: int = 7, kind: str = "sim") -> list[bytes]:
    """``count`` serialised responses of BATCH consecutive events, from sequence 1.

    ``sim``: the simulator's events (about 170 bytes each, 80 kB a response: over
    MAX_EVENT_BYTES); ``replay``: the harness's ingest file's (about 110 bytes each,
    56 kB a response: under it).
    """
    sim = Simulator(random.Random(seed), max_live_sessions=200)
    clock = 1_764_330_000.0
    out: list[bytes] = []
    sequence = 0
    for _ in range(count):
        response = pb.SubscribeResponse(log_id=LOG_ID, oldest_sequence=1)
        stamp = f"t={clock:.6f}"
        for i in range(BATCH):
            if kind == "replay":
                event = parse_line(ingest_line(sequence), sequence + 1) or pb.LifecycleEvent()
            else:
                event = sim.next_event()
                if i % 2:  # half carry the latency stamp, half the simulator's reason
                    event.reason = stamp
            sequence += 1
            event.sequence = sequence
            event.timestamp.FromNanoseconds(int(clock * 1e9))
            response.events.append(event)
        response.head_sequence = sequence
        out.append(response.SerializeToString())
        clock += 0.003
    return out


def hub_frames(batches: list[bytes]) -> list[bytes]:
    """The frames the proxy's hub queues for one superadmin, for these batches."""
    hub = Hub(history_size=HISTORY, outbox_limit=len(batches) * BATCH + 1)
    bridge = UpstreamBridge(UpstreamSettings(), hub)
    bridge.live = True
    bridge._apply(pb.SubscribeResponse(log_id=LOG_ID, head_sequence=0))
    with hub.subscribe(SUPER, Filters()) as sub:
        for data in batches:
            bridge._apply(bridge._decode(data))
        return sub.outbox.take_now()


def floor_once(batches: list[bytes], out: list[bytes] | None = None) -> float:
    """Seconds of CPU the inlined loop takes over every batch (frames into ``out``)."""
    # As the hub: a bounded history, and a client whose frames are written (here:
    # dropped) after each response, unless the caller wants them.
    history: deque[tuple[int, Any, bytes]] = deque(maxlen=HISTORY)
    client: list[bytes] = out if out is not None else []
    keep, put = history.append, client.append
    dumps, parse = orjson.dumps, pb.SubscribeResponse.FromString
    prefix = id_prefix(LOG_ID).encode()
    lines: dict[str, bytes] = {}
    clock = time.thread_time
    t0 = clock()
    for data in batches:
        for m in parse(data).events:
            sequence, name = m.sequence, m.name
            # Every field is read: the proxy's policy and history need all of them.
            ts = m.timestamp
            record = (
                m.session_id,
                m.kernel_id,
                m.owner_access_key,
                m.user_id,
                m.domain_name,
                m.group_name,
                ts.seconds + ts.nanos / 1e9,
                m.session_uuid,
                m.cluster_role,
                m.cluster_idx,
            )
            reason, exit_code, result = m.reason, m.exit_code, _RESULT_BY_ENUM.get(m.result)
            payload: dict[str, Any] = {
                "sessionId": record[0],
                "ownerAccessKey": record[2],
                "reason": reason if reason or "reason" in m else None,
            }
            if result is None and name.endswith(_TERMINATION_SUFFIXES):
                result = "UNDEFINED"
            if result is not None:
                payload["result"] = result
            if record[1]:
                payload["kernelId"] = record[1]
            if exit_code or "exit_code" in m:
                payload["exitCode"] = exit_code
            line = lines.get(name)
            if line is None:
                line = lines[name] = b"event: %s\n" % name.encode()
            frame = b"id: %s%d\n%sdata: %s\n\n" % (prefix, sequence, line, dumps(payload))
            keep((sequence, record, frame))
            # A v4 client: a cluster session's sub-kernels' kernel events are not its.
            role = record[8]
            if not role or role == "main" or not name.startswith("kernel_"):
                put(frame)
        if out is None:
            client.clear()
    return clock() - t0


def run_once(batches: list[bytes]) -> tuple[float, float]:
    """Seconds spent decoding and applying every batch once, into a fresh hub."""
    hub = Hub(history_size=HISTORY, outbox_limit=4096)
    bridge = UpstreamBridge(UpstreamSettings(), hub)
    bridge.live = True  # as after the first response: no "stream live" log line
    # The upstream's first answer names the log and its head before any event.
    bridge._apply(pb.SubscribeResponse(log_id=LOG_ID, head_sequence=0))
    decode = bridge._decode
    apply = bridge._apply
    decoding = applying = 0.0
    clock = time.thread_time  # CPU time: the machine may be busy with other work
    with hub.subscribe(SUPER, Filters()) as sub:
        discard = sub.outbox.discard
        for data in batches:
            t0 = clock()
            response = decode(data)
            t1 = clock()
            apply(response)
            t2 = clock()
            discard()
            decoding += t1 - t0
            applying += t2 - t1
        if sub.outbox.closed:
            raise SystemExit("the subscriber overflowed: the measurement is void")
    if hub.published != len(batches) * BATCH or bridge.malformed:
        raise SystemExit(f"published {hub.published}, malformed {bridge.malformed}")
    return decoding, applying


def measure(batches: list[bytes], repeat: int, floor: bool = False) -> dict[str, float]:
    """Medians in µs per event. ``floor``: each repetition also runs the floor, right
    after the proxy's path, so their ratio comes from the same moments of a shared
    machine (``ratio``: the median of the per-repetition ratios)."""
    events = len(batches) * BATCH
    run_once(batches[:4])  # warm up caches and lazily built descriptors
    if floor:
        floor_once(batches[:4])
    decode: list[float] = []
    apply: list[float] = []
    floors: list[float] = []
    gc.collect()
    for _ in range(repeat):
        d, a = run_once(batches)
        decode.append(d / events * 1e6)
        apply.append(a / events * 1e6)
        if floor:
            floors.append(floor_once(batches) / events * 1e6)
    total = [d + a for d, a in zip(decode, apply, strict=True)]
    out = {
        "total": statistics.median(total),
        "decode": statistics.median(decode),
        "apply": statistics.median(apply),
        "min_total": min(total),
    }
    if floor:
        out["floor"] = statistics.median(floors)
        out["ratio"] = statistics.median(t / f for t, f in zip(total, floors, strict=True))
    return out


def profile(work: Callable[[], object]) -> None:
    prof = cProfile.Profile()
    prof.runcall(work)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100, help="responses per repetition")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="cProfile one repetition")
    parser.add_argument("--events", choices=("sim", "replay"), default="sim")
    parser.add_argument(
        "--floor", action="store_true", help="also time the inlined loop (see the docstring)"
    )
    args = parser.parse_args()
    batches = build_batches(args.batches, kind=args.events)
    if args.profile:
        profile(lambda: run_once(batches))
        return
    if args.floor:
        check = batches[:4]
        mine: list[bytes] = []
        floor_once(check, mine)
        if mine != hub_frames(check):
            raise SystemExit("the floor's frames differ from the hub's: it is not the same work")
    r = measure(batches, args.repeat, args.floor)
    events = len(batches) * BATCH
    print(
        f"{args.events}: µs/event (median of {args.repeat} x {events} events): "
        f"total {r['total']:.3f} = decode {r['decode']:.3f} + apply {r['apply']:.3f}"
        f"  (best total {r['min_total']:.3f})"
    )
    if args.floor:
        print(
            f"{args.events}: floor (one inlined loop, the same frames): {r['floor']:.3f} "
            f"µs/event; the proxy's path is {r['ratio']:.2f}x it (median of the "
            "repetitions' ratios)"
        )


if __name__ == "__main__":
    main()
