"""The benchmark's upstream: the project's gRPC server, fed on command by the harness.

    python -m bench.upstream_driver --listen 127.0.0.1:PORT [--replay FILE]

It runs ``proxy.upstream_server.UpstreamServer`` over an ``EventLog`` in this process
(as ``kernel-events-proxy upstream`` does) and appends events when the harness says:

- ``ingest``: the replay file (parsed once at start with ``proxy.replay``, as
  ``upstream --replay FILE`` parses it), appended as fast as it goes in chunks of 512
  (``--rate 0``), so that the measurement starts with the subscriber attached;
- ``send``: generated events at a controlled rate (or as fast as it goes), each batch
  stamped ``reason = "t=<time.time()>"`` just before it is appended, so clients can
  measure latency from the upstream's append to their receipt.

``trim`` empties the retained log (``EventLog.forget``) so that every scenario, and
every ingest run, starts from the same upstream state; ``stop`` ends a paced ``send``
early (the storm scenario sends until its storm is over).
every ingest run, starts from the same upstream state. The log's state table (what a
snapshot serves) outlives that; ``clear_state`` empties it too, and ``populate``
appends one event for each of N sessions (the dashboard storm's), so a state holds
exactly those.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.replay import ReplayLineError, read_file_events
from proxy.upstream_server import EventLog, UpstreamServer

from .common import Json, command_loop, reply, scenario_event, storm_event

CHUNK: Final = 512  # what the shipped replay feeder appends at once


class Driver:
    def __init__(
        self, event_log: EventLog, server: UpstreamServer, replay: list[pb.LifecycleEvent]
    ):
        self.log = event_log
        self.server = server
        self.replay = replay
        self._thread: threading.Thread | None = None
        self._result: Json = {}
        self._stop = threading.Event()

    def handle(self, cmd: Json) -> Json:
        op = cmd["op"]
        if op == "status":
            return {
                "head": self.log.head,
                "subscribers": self.server.active_subscribers,
                "replay": len(self.replay),
            }
        if op == "trim":
            if self._thread is not None:
                raise RuntimeError("a send is running")
            dropped = self.log.forget()
            gc.collect()
            return {"dropped": dropped}
        if op == "clear_state":
            if self._thread is not None:
                raise RuntimeError("a send is running")
            self.log.forget()
            self.log.state.reset(self.log.log_id, self.log.head)
            gc.collect()
            return {"head": self.log.head}
        if op == "populate":
            if self._thread is not None:
                raise RuntimeError("a send is running")
            events = [storm_event(i) for i in range(int(cmd["count"]))]
            for i in range(0, len(events), CHUNK):
                self.log.append(events[i : i + CHUNK])
            return {"head": self.log.head, "sessions": len(events)}
        if op == "ingest":
            # Copies are made before the clock starts: appending assigns sequences.
            count = int(cmd.get("count") or len(self.replay))
            batch = [self._fresh(e) for e in self.replay[:count]]
            return self._start(lambda: self._append_fast(batch))
        if op == "send":
            kind, count = str(cmd["kind"]), int(cmd["count"])
            users, rate = int(cmd.get("users", 1)), float(cmd.get("rate", 0.0))
            return self._start(lambda: self._send(kind, count, users, rate))
        if op == "stop":
            self._stop.set()
            return {"ok": True}
        if op == "wait":
            if self._thread is not None:
                self._thread.join(float(cmd.get("timeout", 600)))
                if self._thread.is_alive():
                    return {"error": "still sending"}
                self._thread = None
            return self._result
        raise ValueError(f"unknown op {op!r}")

    @staticmethod
    def _fresh(template: pb.LifecycleEvent) -> pb.LifecycleEvent:
        event = pb.LifecycleEvent()
        event.CopyFrom(template)
        event.sequence = 0
        event.ClearField("timestamp")
        return event

    def _start(self, work: Callable[[], None]) -> Json:
        if self._thread is not None:
            raise RuntimeError("a send is already running")
        self._result = {}
        self._stop.clear()
        self._thread = threading.Thread(target=work, name="bench-send", daemon=True)
        self._thread.start()
        return {"ok": True}

    def _append_fast(self, events: list[pb.LifecycleEvent]) -> None:
        first = time.time()
        for i in range(0, len(events), CHUNK):
            self.log.append(events[i : i + CHUNK])
        self._result = {"first": first, "last": time.time(), "count": len(events)}

    def _send(self, kind: str, count: int, users: int, rate: float) -> None:
        start = time.time()
        first = 0.0
        sent = 0
        while sent < count and not self._stop.is_set():
            now = time.time()
            if rate > 0:
                due = min(count, int((now - start) * rate) + 1)
                if due <= sent:
                    time.sleep(max(0.0, start + sent / rate - now))
                    continue
            else:
                due = min(count, sent + CHUNK)
            stamp = f"t={time.time():.6f}"
            batch = [scenario_event(kind, i, users, stamp) for i in range(sent, due)]
            if not first:
                first = time.time()
            self.log.append(batch)
            sent = due
        self._result = {"first": first, "last": time.time(), "count": sent}


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark upstream (gRPC, loopback)")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--replay", type=Path, help="JSON Lines file for the ingest scenario")
    parser.add_argument("--history", type=int, default=600_000, help="events retained")
    args = parser.parse_args()
    replay: list[pb.LifecycleEvent] = []
    if args.replay:
        for item in read_file_events(args.replay):
            if isinstance(item, ReplayLineError):
                raise SystemExit(f"{args.replay}: {item}")
            replay.append(item)
    event_log = EventLog(capacity=args.history)
    server = UpstreamServer(event_log, args.listen, max_subscribers=16)
    server.start()
    reply({"target": server.target, "replay": len(replay)})
    try:
        command_loop(Driver(event_log, server, replay).handle)
    finally:
        event_log.close()
        server.stop(0.5)


if __name__ == "__main__":
    main()
