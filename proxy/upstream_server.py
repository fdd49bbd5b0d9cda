"""The upstream that ships with the project: a real gRPC server over an event log.

It serves ``KernelEventsService.Subscribe`` from a bounded, thread-safe log, and
``Snapshot`` from the state table (state.py) the log folds each event into as it is
appended, so trimming the log never loses where a session stands. What fills
the log is up to the caller: the simulator, a replay file, or a test appending events.
The same server runs standalone (``kernel-events-proxy upstream``), in-process for
``serve --demo``, and in the tests.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent import futures

import grpc

from ._pb.kernel_events.v1 import events_pb2 as pb
from ._pb.kernel_events.v1 import events_pb2_grpc as pb_grpc
from .state import State

log = logging.getLogger(__name__)

MAX_BATCH = 512
# A response stays under this many bytes (an event larger than it goes alone), so an
# event too large for a subscriber is alone in its message: it can skip just that one.
MAX_BATCH_BYTES = 1024 * 1024


class EventLog:
    """An append-only log of lifecycle events, of which the newest ``capacity`` are kept.

    The events live in a list, the retained ones at ``[_start:]``; the forgotten prefix
    is cut off once it is as long as the capacity, so appending stays amortised O(1)
    and reading n events is an O(n) slice wherever the reader is. (A deque's indexing
    costs O(distance from its ends): 3 µs an event for a reader 150,000 events behind.)

    The state table (state.py) is folded from the list lazily: events still in it are
    folded when a snapshot is read, and before they are cut off or forgotten, never
    on the append path (reading a protobuf message's fields for the fold costs about
    2.6 µs an event: folding as it appends throttled every subscriber to about a
    third of its rate). Each event is folded exactly once, in log order.
    """

    def __init__(
        self,
        capacity: int = 100_000,
        log_id: str | None = None,
        *,
        retention: float = 3600.0,
        max_entities: int = 1_000_000,
    ) -> None:
        self.log_id = log_id or uuid.uuid4().hex
        self._capacity = max(capacity, 0)
        self._events: list[pb.LifecycleEvent] = []
        self._start = 0  # index of the oldest retained event in _events
        self._cond = threading.Condition()
        self._head = 0
        self._closed = False
        # Where every session stands: _events[:_unfolded] are folded into it.
        self.state: State[pb.LifecycleEvent] = State(
            retention=retention, max_entities=max_entities, stamp=_stamp
        )
        self.state.reset(self.log_id, 0)
        self._unfolded = 0  # index in _events of the first event not folded yet

    @property
    def head(self) -> int:
        return self._head

    def append(self, events: Iterable[pb.LifecycleEvent]) -> int:
        """Append events, assigning missing sequences and timestamps; return the head.

        An explicit sequence must be greater than the head (gaps are allowed: they
        model events the log lost).
        """
        with self._cond:
            now = time.time()
            kept = self._events
            for event in events:
                if event.sequence == 0:
                    event.sequence = self._head + 1
                elif event.sequence <= self._head:
                    raise ValueError(f"sequence {event.sequence} is not after {self._head}")
                if not event.HasField("timestamp"):
                    event.timestamp.FromNanoseconds(int(now * 1e9))
                kept.append(event)
                self._head = event.sequence
            self._start = max(self._start, len(kept) - self._capacity)
            if self._start and self._start >= self._capacity:  # amortised: O(1) an event
                self._fold(self._start)
                del kept[: self._start]
                self._unfolded -= self._start
                self._start = 0
            self._cond.notify_all()
            return self._head

    def _fold(self, until: int) -> None:
        """Fold ``_events[_unfolded:until]`` into the state (the lock is held)."""
        apply = self.state.apply
        for event in self._events[self._unfolded : until]:
            apply(event)
        self._unfolded = max(self._unfolded, until)

    def forget(self) -> int:
        """Drop every retained event (sequences go on from the head); return how many.

        The state stays: it is what a snapshot serves when the events are gone."""
        with self._cond:
            dropped = len(self._events) - self._start
            self._fold(len(self._events))
            self._events.clear()
            self._start = self._unfolded = 0
            return dropped

    def snapshot(self) -> tuple[int, list[pb.LifecycleEvent]]:
        """The head and the state's events at it, read atomically with appends."""
        with self._cond:
            self._fold(len(self._events))
            return self._head, list(self.state.snapshot())

    def oldest(self) -> int:
        with self._cond:
            return self._oldest()

    def _oldest(self) -> int:
        events, start = self._events, self._start
        return events[start].sequence if start < len(events) else self._head + 1

    def read_after(
        self, after: int, limit: int, timeout: float
    ) -> tuple[list[pb.LifecycleEvent], int, int]:
        """Events with sequence > ``after`` (waiting up to ``timeout`` for the first)."""
        with self._cond:
            if self._head <= after and not self._closed:
                self._cond.wait(timeout)
            out: list[pb.LifecycleEvent] = []
            if self._start < len(self._events) and self._head > after:
                i = self._position_after(after)
                out = self._events[i : i + limit]
            return out, self._oldest(), self._head

    def _position_after(self, after: int) -> int:
        """Index of the first retained event with a sequence greater than ``after``."""
        events, start, end = self._events, self._start, len(self._events)
        # Sequences are consecutive unless a replay gave explicit ones with gaps, so
        # the position is usually plain arithmetic; a reader far behind a burst must
        # not pay for a scan of everything it is behind.
        i = start + min(max(after - events[start].sequence + 1, 0), end - start)
        if (i == start or events[i - 1].sequence <= after) and (
            i == end or events[i].sequence > after
        ):
            return i
        i = end
        while i > start and events[i - 1].sequence > after:
            i -= 1
        return i

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class KernelEventsServicer(pb_grpc.KernelEventsServiceServicer):
    def __init__(self, event_log: EventLog, poll_interval: float = 0.5) -> None:
        self._log = event_log
        self._poll = poll_interval
        self._lock = threading.Lock()
        self.active = 0

    def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SubscribeResponse]:
        event_log = self._log
        if request.log_id and request.log_id != event_log.log_id:
            # The cursor belongs to an earlier incarnation of this log: everything we
            # still hold is news to this subscriber.
            position = event_log.oldest() - 1
        elif request.after_sequence or request.log_id:
            # A cursor in this log (0 included: the position of its empty snapshot).
            position = request.after_sequence
        else:
            position = event_log.head
        context.add_callback(event_log.wake)
        with self._lock:
            self.active += 1
        try:
            yield from self._stream(event_log, position, context)
        finally:
            with self._lock:
                self.active -= 1

    def Snapshot(
        self, request: pb.SnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SnapshotResponse]:
        event_log = self._log
        head, events = event_log.snapshot()
        if request.max_event_bytes:
            events = [e for e in events if e.ByteSize() <= request.max_event_bytes]
        chunks = list(_by_size(events)) or [[]]
        for i, chunk in enumerate(chunks):
            yield pb.SnapshotResponse(
                log_id=event_log.log_id, sequence=head, events=chunk, last=i == len(chunks) - 1
            )

    def _stream(
        self, event_log: EventLog, position: int, context: grpc.ServicerContext
    ) -> Iterator[pb.SubscribeResponse]:
        _, oldest, head = event_log.read_after(position, 0, 0)
        # A first, empty response tells the subscriber which log it is attached to.
        yield pb.SubscribeResponse(
            log_id=event_log.log_id, oldest_sequence=oldest, head_sequence=head
        )
        while context.is_active() and not event_log.closed:
            events, oldest, head = event_log.read_after(position, MAX_BATCH, self._poll)
            for batch in _by_size(events):
                position = batch[-1].sequence
                yield pb.SubscribeResponse(
                    log_id=event_log.log_id,
                    events=batch,
                    oldest_sequence=oldest,
                    head_sequence=head,
                )


def _stamp(event: pb.LifecycleEvent) -> float:
    ts = event.timestamp
    return ts.seconds + ts.nanos / 1e9


def _by_size(events: list[pb.LifecycleEvent]) -> Iterator[list[pb.LifecycleEvent]]:
    """Consecutive runs of ``events`` of at most MAX_BATCH_BYTES each (or one event)."""
    batch: list[pb.LifecycleEvent] = []
    size = 0
    for event in events:
        n = event.ByteSize()
        if batch and size + n > MAX_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(event)
        size += n
    if batch:
        yield batch


class UpstreamServer:
    """A gRPC server for one EventLog, started and stopped by its owner."""

    def __init__(self, event_log: EventLog, listen: str = "127.0.0.1:0", max_subscribers: int = 64):
        self.log = event_log
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_subscribers, thread_name_prefix="upstream"),
            maximum_concurrent_rpcs=max_subscribers,
            options=[
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        self._servicer = KernelEventsServicer(event_log)
        pb_grpc.add_KernelEventsServiceServicer_to_server(self._servicer, self._server)
        host, _, _ = listen.rpartition(":")
        self.port = self._server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        self.target = f"{host}:{self.port}"

    @property
    def active_subscribers(self) -> int:
        return self._servicer.active

    def start(self) -> None:
        self._server.start()
        log.info("upstream serving log %s on %s", self.log.log_id, self.target)

    def stop(self, grace: float | None = 0) -> None:
        """Stop serving; the log survives, so a new server over it can resume readers."""
        stopped = self._server.stop(grace)
        self.log.wake()
        stopped.wait()

    def wait(self) -> None:
        self._server.wait_for_termination()
