"""The upstream subscription: one grpcio stream per process, bridged into Trio.

grpcio's blocking iterator runs in a worker thread. It hands responses to Trio in
batches: it appends to a deque and schedules one wake-up per burst with
``TrioToken.run_sync_soon``. Cancellation reaches the thread through ``call.cancel()``,
called from a sibling task's ``finally``, so no thread outlives the bridge.
On any failure the bridge reconnects with exponential backoff and full jitter and
resumes after the last sequence it saw; clients stay connected meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import grpc
import trio

from ._pb.kernel_events.v1 import events_pb2 as pb
from ._pb.kernel_events.v1 import events_pb2_grpc as pb_grpc
from .config import UpstreamSettings
from .eventid import format_id, valid_log_id
from .events import Event, MalformedEvent, from_proto
from .hub import Hub

log = logging.getLogger(__name__)

# Responses the thread may queue before it stops reading (gRPC flow control then
# pushes back on the upstream instead of this process growing without bound).
MAX_PENDING_RESPONSES: Final = 1024


@dataclass(frozen=True, slots=True)
class Gap:
    reason: str
    after: str | None
    before: str | None


@dataclass(frozen=True, slots=True)
class Fetched:
    """Part of the upstream's log fetched for one client's catch-up."""

    events: list[Event]
    reached: int  # the cursor after this fetch: every sequence up to it is accounted for
    gap: Gap | None = None  # what the upstream no longer has (or could not give)


class Sequencer:
    """Pure bookkeeping of the upstream position: drops duplicates, names gaps."""

    def __init__(self) -> None:
        self.log_id: str | None = None
        self.last = 0

    def attach(self, log_id: str, head: int) -> None:
        """A first, live-only subscription starts at the upstream's head."""
        if self.log_id is None:
            self.log_id, self.last = log_id, head

    def accept(self, log_id: str, sequences: Sequence[int]) -> tuple[int, Gap | None]:
        """Return how many leading events are duplicates to drop, and any gap."""
        gap: Gap | None = None
        previous = format_id(self.log_id, self.last) if self.log_id else None
        if self.log_id is not None and log_id != self.log_id:
            # The upstream restarted with a new log: whatever followed our last event
            # in the old log is gone.
            first = sequences[0] if sequences else None
            gap = Gap("upstream-restarted", previous, format_id(log_id, first) if first else None)
            self.last = 0
        known = self.log_id is not None
        self.log_id = log_id
        skip = 0
        while skip < len(sequences) and sequences[skip] <= self.last:
            skip += 1
        if skip < len(sequences):
            first = sequences[skip]
            if gap is None and known and first > self.last + 1:
                gap = Gap("upstream-gap", previous, format_id(log_id, first))
            self.last = sequences[-1]
        return skip, gap


class _Pump:
    """Thread-to-Trio hand-off: a deque and one wake-up per burst."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._items: deque[pb.SubscribeResponse] = deque()
        self._cond = threading.Condition()
        self._scheduled = False
        self._closed = False
        self._ready = trio.Event()

    # worker thread side
    def push(self, item: pb.SubscribeResponse) -> bool:
        with self._cond:
            while len(self._items) >= MAX_PENDING_RESPONSES and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._items.append(item)
            wake, self._scheduled = not self._scheduled, True
        if wake:
            self._token.run_sync_soon(self._wake)
        return True

    # Trio side
    def _wake(self) -> None:
        self._ready.set()

    def take_nowait(self) -> list[pb.SubscribeResponse]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._scheduled = False
            self._cond.notify_all()
        return items

    async def take(self) -> list[pb.SubscribeResponse]:
        await self._ready.wait()
        self._ready = trio.Event()
        return self.take_nowait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _safe_log_id(raw: str) -> str:
    # Ids go into `id:` lines and cursors; anything unusual is replaced by a stable
    # digest, so every replica still derives the same id.
    return raw if valid_log_id(raw) else hashlib.sha256(raw.encode()).hexdigest()[:32]


class UpstreamBridge:
    def __init__(
        self,
        settings: UpstreamSettings,
        hub: Hub,
        *,
        rng: random.Random | None = None,
        channel_factory: Callable[[str], grpc.Channel] | None = None,
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._rng = rng or random.Random()
        self._channel_factory = channel_factory or self._default_channel
        self._limiter = trio.CapacityLimiter(1)
        # Catch-ups each hold a worker thread; a reconnect storm must not spawn hundreds.
        self._fetch_limiter = trio.CapacityLimiter(4)
        self.sequencer = Sequencer()
        self.live = False
        self._attached = False
        self.connects = 0
        self.received = 0
        self.malformed = 0

    def _default_channel(self, target: str) -> grpc.Channel:
        s = self._settings
        return grpc.insecure_channel(
            target,
            options=[
                ("grpc.keepalive_time_ms", int(s.keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout * 1000)),
                # Recent grpc-core times unanswered pings with this (default one minute),
                # not with the keepalive timeout alone.
                ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                # We do our own backoff with jitter; keep grpc's reconnects quick.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )

    async def run(self) -> None:
        """Subscribe forever; returns only when cancelled."""
        s = self._settings
        delay = s.reconnect_min
        while True:
            received_before = self.received
            try:
                await self._stream_once()
                reason = "stream ended"
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                reason = f"{code.name if code else 'error'}: {_details(exc)}"
            self.live = False
            if self.received != received_before:
                delay = s.reconnect_min
            pause = self._rng.uniform(delay / 2, delay)
            log.warning("upstream %s: %s; reconnecting in %.2fs", s.target, reason, pause)
            await trio.sleep(pause)
            delay = min(delay * 2, s.reconnect_max)

    async def _stream_once(self) -> None:
        channel = self._channel_factory(self._settings.target)
        try:
            stub = pb_grpc.KernelEventsServiceStub(channel)
            request = pb.SubscribeRequest(
                after_sequence=self.sequencer.last, log_id=self.sequencer.log_id or ""
            )
            call = stub.Subscribe(request)
            self.connects += 1
            pump = _Pump(trio.lowlevel.current_trio_token())
            error: grpc.RpcError | None = None
            self._attached = False
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._consume, pump)
                nursery.start_soon(_cancel_on_exit, call, pump)
                nursery.start_soon(self._attach_watchdog, call)
                try:
                    await trio.to_thread.run_sync(_drain, call, pump, limiter=self._limiter)
                except grpc.RpcError as exc:
                    error = exc
                # What the thread queued before it stopped still counts.
                self._apply_all(pump.take_nowait())
                nursery.cancel_scope.cancel()
            if error is not None:
                raise error
        finally:
            channel.close()

    async def fetch(self, log_id: str, after: int, until: int, limit: int = 5000) -> Fetched:
        """Read events (after, until] of ``log_id`` from the upstream, at most ``limit``.

        For a client resuming from before this proxy's history. Whatever the upstream
        cannot give (its log changed, it no longer retains them, it does not answer)
        comes back as a gap, so the caller can say so instead of skipping silently.
        """
        request = pb.SubscribeRequest(after_sequence=after, log_id=log_id)
        lost = Gap("upstream-unavailable", format_id(log_id, after), format_id(log_id, until + 1))
        channel = self._channel_factory(self._settings.target)
        try:
            call = pb_grpc.KernelEventsServiceStub(channel).Subscribe(
                request, timeout=self._settings.connect_timeout + 30
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_exit, call, None)
                responses = await trio.to_thread.run_sync(
                    _collect, call, log_id, after, until, limit, limiter=self._fetch_limiter
                )
                nursery.cancel_scope.cancel()
        except grpc.RpcError as exc:
            log.warning("catch-up from %s failed: %s", self._settings.target, _details(exc))
            return Fetched([], until, lost)
        finally:
            channel.close()
        return _fetched(log_id, after, until, responses, lost)

    async def _attach_watchdog(self, call: grpc.Call) -> None:
        # The upstream answers a subscription at once (its first response names the
        # log). A peer that accepts the connection but never answers would otherwise
        # hold us for as long as TCP allows.
        await trio.sleep(self._settings.connect_timeout)
        if not self._attached:
            log.warning(
                "upstream %s: no answer within %.1fs",
                self._settings.target,
                self._settings.connect_timeout,
            )
            call.cancel()  # type: ignore[no-untyped-call]

    async def _consume(self, pump: _Pump) -> None:
        while True:
            for response in await pump.take():
                self._apply(response)
                # Let client writers drain between upstream batches, so a burst that
                # piled up in the pump is not mistaken for a client being slow.
                await trio.lowlevel.checkpoint()

    def _apply_all(self, responses: list[pb.SubscribeResponse]) -> None:
        for response in responses:
            self._apply(response)

    def _apply(self, response: pb.SubscribeResponse) -> None:
        self._attached = True
        if not self.live:
            self.live = True
            log.info("upstream %s: stream live", self._settings.target)
        log_id = _safe_log_id(response.log_id)
        messages = response.events
        self.sequencer.attach(log_id, response.head_sequence)
        self._hub.attach(log_id, self.sequencer.last)
        skip, gap = self.sequencer.accept(log_id, [m.sequence for m in messages])
        if gap is not None:
            self._hub.publish_gap(gap.reason, gap.after, gap.before)
        events: list[Event] = []
        for msg in messages[skip:]:
            try:
                events.append(from_proto(msg))
            except MalformedEvent as exc:
                self.malformed += 1
                log.warning("skipping malformed upstream event: %s", exc)
        self.received += len(messages)
        if events:
            self._hub.publish(log_id, events)


def _collect(
    call: grpc.Call, log_id: str, after: int, until: int, limit: int
) -> list[pb.SubscribeResponse]:
    """Worker thread: read responses until ``until`` (or ``limit`` events) is covered."""
    out: list[pb.SubscribeResponse] = []
    count = 0
    target = until
    try:
        for response in call:  # type: ignore[attr-defined]
            out.append(response)
            if len(out) == 1:
                # The first response names the log and its head: a different log, or one
                # that ends before `until`, cannot give us more than it has now.
                if _safe_log_id(response.log_id) != log_id:
                    break
                target = min(until, response.head_sequence)
            count += len(response.events)
            last = response.events[-1].sequence if response.events else 0
            if count >= limit or last >= target or target <= after:
                break
    except grpc.RpcError as exc:
        if not (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.CANCELLED):
            raise
    finally:
        call.cancel()  # type: ignore[no-untyped-call]
    return out


def _fetched(
    log_id: str, after: int, until: int, responses: list[pb.SubscribeResponse], lost: Gap
) -> Fetched:
    """Turn a catch-up's raw responses into the events a client is owed (pure)."""
    if not responses:
        return Fetched([], until, lost)
    hello = responses[0]
    if _safe_log_id(hello.log_id) != log_id:
        return Fetched([], until, Gap("upstream-restarted", lost.after, lost.before))
    events: list[Event] = []
    reached = after
    gap: Gap | None = None
    for response in responses:
        for msg in response.events:
            if msg.sequence <= reached or msg.sequence > until:
                continue
            if msg.sequence > reached + 1 and gap is None:
                gap = Gap(
                    "history-exhausted", format_id(log_id, reached), format_id(log_id, msg.sequence)
                )
            reached = msg.sequence
            try:
                events.append(from_proto(msg))
            except MalformedEvent as exc:
                log.warning("skipping malformed upstream event: %s", exc)
    if reached < until and hello.head_sequence < until:
        # The upstream's log ends before what this proxy has seen: it cannot be had.
        gap = gap or Gap(
            "history-exhausted", format_id(log_id, reached), format_id(log_id, until + 1)
        )
        reached = until
    return Fetched(events, reached, gap)


def _drain(call: grpc.Call, pump: _Pump) -> None:
    """Worker thread: read the blocking iterator until it ends, fails or is cancelled."""
    try:
        for response in call:  # type: ignore[attr-defined]
            if not pump.push(response):
                return
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.CANCELLED:
            return
        raise


async def _cancel_on_exit(call: grpc.Call, pump: _Pump | None) -> None:
    try:
        await trio.sleep_forever()
    finally:
        call.cancel()  # type: ignore[no-untyped-call]
        if pump is not None:
            pump.close()


def _details(exc: grpc.RpcError) -> str:
    details = exc.details() if isinstance(exc, grpc.Call) else None
    return details or str(exc)
