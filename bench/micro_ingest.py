"""In-process microbenchmark of the ingest path: decode -> UpstreamBridge._apply -> Hub.

    python -m bench.micro_ingest [--events sim|replay] [--batches 100] [--repeat 7]
                                 [--profile]

Builds SubscribeResponses of 512 events each (``sim``: the simulator's sessions,
owners, users, uuid kernel ids and reasons, half of them ``t=<time>`` as the
benchmark's ``send`` stamps them; ``replay``: the harness's ingest file), with
upstream timestamps, and serialises them. Then it times, in CPU time of this thread
(the machine may be busy with other work), decoding each one and applying it to a
real ``Hub`` with one superadmin subscriber, as the Trio thread does. Each repetition
starts a fresh bridge and hub (the sequencer would drop a replayed batch as
duplicates); it prints the median µs per event, total and split into decode and
apply. No network, no Trio scheduling: only the per-event CPU of the path itself.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import statistics
import time
from collections.abc import Callable

from bench.common import ingest_line
from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.config import UpstreamSettings
from proxy.hub import Hub
from proxy.policy import Filters, Principal, Role
from proxy.replay import parse_line
from proxy.simulator import Simulator
from proxy.upstream import UpstreamBridge

BATCH = 512  # what the shipped upstream and the benchmark send per response
LOG_ID = "2f1c0b7e4a9d4c3e8b6a5f0e1d2c3b4a"
SUPER = Principal("AKBENCHSUPER", Role.SUPERADMIN, "bench-super", "default")


def build_batches(count: int, seed: int = 7, kind: str = "sim") -> list[bytes]:
    """``count`` serialised responses of BATCH consecutive events, from sequence 1.

    ``sim``: the simulator's events (about 140 bytes each, 73 kB a response: over
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


def run_once(batches: list[bytes]) -> tuple[float, float]:
    """Seconds spent decoding and applying every batch once, into a fresh hub."""
    hub = Hub(history_size=10_000, outbox_limit=4096)
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


def measure(batches: list[bytes], repeat: int) -> dict[str, float]:
    events = len(batches) * BATCH
    run_once(batches[:4])  # warm up caches and lazily built descriptors
    decode: list[float] = []
    apply: list[float] = []
    gc.collect()
    for _ in range(repeat):
        d, a = run_once(batches)
        decode.append(d / events * 1e6)
        apply.append(a / events * 1e6)
    total = [d + a for d, a in zip(decode, apply, strict=True)]
    return {
        "total": statistics.median(total),
        "decode": statistics.median(decode),
        "apply": statistics.median(apply),
        "min_total": min(total),
    }


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
    args = parser.parse_args()
    batches = build_batches(args.batches, kind=args.events)
    if args.profile:
        profile(lambda: run_once(batches))
        return
    r = measure(batches, args.repeat)
    print(
        f"{args.events}: µs/event (median of {args.repeat} x {len(batches) * BATCH} events): "
        f"total {r['total']:.3f} = decode {r['decode']:.3f} + apply {r['apply']:.3f}"
        f"  (best total {r['min_total']:.3f})"
    )


if __name__ == "__main__":
    main()
