"""What fills the shipped upstream's log: the simulator, or a replayed JSON Lines file.

Each feeder is a plain function run in a thread by its owner, which stops it through a
``threading.Event`` and joins it: the owner outlives it.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path

from ._pb.kernel_events.v1 import events_pb2 as pb
from .replay import LineFollower, ReplayLineError, SequenceAssigner, parse_line
from .simulator import Simulator
from .upstream_server import EventLog

log = logging.getLogger(__name__)

_TICK = 0.02
_CHUNK = 512
_FOLLOW_POLL = 0.1


class _Pacer:
    """Spreads ``rate`` events per second over small ticks (0 means: no pacing)."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._start = time.monotonic()
        self._sent = 0

    def allowance(self, stop: threading.Event) -> int:
        if self._rate <= 0:
            return _CHUNK
        while not stop.is_set():
            due = int((time.monotonic() - self._start) * self._rate) - self._sent
            if due > 0:
                return min(due, _CHUNK)
            stop.wait(_TICK)
        return 0

    def sent(self, n: int) -> None:
        self._sent += n


def run_simulator(
    event_log: EventLog, rate: float, stop: threading.Event, seed: int | None = None
) -> None:
    simulator = Simulator(random.Random(seed))
    pacer = _Pacer(rate)
    while not stop.is_set():
        n = pacer.allowance(stop)
        if n:
            event_log.append([simulator.next_event() for _ in range(n)])
            pacer.sent(n)


def run_replay(
    event_log: EventLog, path: Path, stop: threading.Event, *, follow: bool, rate: float
) -> None:
    """Stream a file's events in order; with ``follow``, also lines appended later."""
    follower = LineFollower()
    assigner = SequenceAssigner()
    assigner.last = event_log.head
    pacer = _Pacer(rate)
    pending: list[pb.LifecycleEvent] = []
    position = 0
    with path.open("rb") as handle:
        while not stop.is_set():
            data = handle.read(1 << 16)
            if not data:
                if not follow:
                    # The last line may lack its newline: it is complete all the same.
                    follower_tail = follower.feed(b"\n")
                    pending.extend(_parse(follower_tail, assigner))
                    _flush(event_log, pending, pacer, stop)
                    log.info("replay of %s done: log head %d", path, event_log.head)
                    return
                _flush(event_log, pending, pacer, stop)
                stop.wait(_FOLLOW_POLL)
                if os.stat(path).st_size < position:
                    log.warning("%s was truncated; following it from the start", path)
                    handle.seek(0)
                    position = 0
                    follower.reset()
                continue
            position += len(data)
            pending.extend(_parse(follower.feed(data), assigner))
            if len(pending) >= _CHUNK:
                _flush(event_log, pending, pacer, stop)


def _parse(lines: list[tuple[int, str]], assigner: SequenceAssigner) -> list[pb.LifecycleEvent]:
    out = []
    for lineno, text in lines:
        try:
            event = parse_line(text, lineno)
            if event is None:
                continue
            assigner.assign(event, lineno)
        except ReplayLineError as exc:
            log.error("replay: %s (skipped)", exc)
            continue
        out.append(event)
    return out


def _flush(
    event_log: EventLog, pending: list[pb.LifecycleEvent], pacer: _Pacer, stop: threading.Event
) -> None:
    while pending and not stop.is_set():
        n = pacer.allowance(stop)
        batch, pending[:] = pending[:n], pending[n:]
        event_log.append(batch)
        pacer.sent(len(batch))
