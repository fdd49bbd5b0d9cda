"""The upstream subscription: one grpcio stream per process, bridged into Trio.

grpcio's blocking iterator runs in a worker thread. It hands responses to Trio in
batches: it appends to a deque and schedules one wake-up per burst with
``TrioToken.run_sync_soon``. Cancellation reaches the thread through ``call.cancel()``,
called from a sibling task's ``finally``, so no thread outlives the bridge.
On any failure the bridge reconnects with exponential backoff and full jitter and
resumes after the last sequence it saw; clients stay connected meanwhile.

When the hub wants a state (a stream asked for ``initialState``, or one is kept:
``state.idle_timeout``), the upstream's ``Snapshot`` (where every session stands, at a
log position) is read and folded in a worker thread and handed to the hub whole: at a
connection, before it subscribes (the first subscription then starts from exactly that
position: list, then watch), or in the consumer's round when asked later.
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
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from ._pb.kernel_events.v1 import events_pb2 as pb
from .config import StateSettings, UpstreamSettings
from .eventid import Cursor, format_id, valid_log_id
from .events import MAX_EVENT_BYTES, Event, MalformedEvent, from_proto
from .hub import Hub, new_state
from .state import State

log = logging.getLogger(__name__)

SUBSCRIBE_METHOD: Final = "/kernel_events.v1.KernelEventsService/Subscribe"
SNAPSHOT_METHOD: Final = "/kernel_events.v1.KernelEventsService/Snapshot"
_LOG_ID_FIELD, _EVENTS_FIELD, _OLDEST_FIELD, _HEAD_FIELD = (
    pb.SubscribeResponse.DESCRIPTOR.fields_by_name[name].number
    for name in ("log_id", "events", "oldest_sequence", "head_sequence")
)

# Events published before client writers get to run. Publishing everything that has
# piled up in one round is what lets a writer send many events in one write when the
# proxy falls behind (a write costs far more than an event); the bound keeps a round
# well inside a client's outbox (server.outbox_limit, default 4096).
PUBLISH_ROUND: Final = 1024

# Responses the thread may queue before it stops reading (gRPC flow control then
# pushes back on the upstream instead of this process growing without bound).
MAX_PENDING_RESPONSES: Final = 1024
# In the details of the RESOURCE_EXHAUSTED a too-large message fails a call with.
_OVERSIZED: Final = "larger than max"


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

    def accept(self, log_id: str, sequences: Sequence[int]) -> tuple[int, list[tuple[int, Gap]]]:
        """How many leading events are duplicates to drop, and the gaps among the rest.

        A gap is ``(i, gap)``: events are missing just before ``sequences[i]`` (or, at
        ``i == len(sequences)``, after the batch: the log changed and nothing followed
        yet). Whatever could not be forwarded is simply absent from ``sequences``, so
        it shows up here as a gap too.
        """
        gaps: list[tuple[int, Gap]] = []
        previous = format_id(self.log_id, self.last) if self.log_id else None
        known = self.log_id is not None
        restarted = known and log_id != self.log_id
        if restarted:
            # The upstream restarted with a new log: whatever followed our last event
            # in the old log is gone.
            self.last = 0
        self.log_id = log_id
        skip = 0
        while skip < len(sequences) and sequences[skip] <= self.last:
            skip += 1
        if restarted:
            first = sequences[skip] if skip < len(sequences) else None
            before = format_id(log_id, first) if first else None
            gaps.append((skip, Gap("upstream-restarted", previous, before)))
        for i in range(skip, len(sequences)):
            sequence = sequences[i]
            if known and not (restarted and i == skip) and sequence > self.last + 1:
                after, before = format_id(log_id, self.last), format_id(log_id, sequence)
                gaps.append((i, Gap("upstream-gap", after, before)))
            self.last = sequence
        return skip, gaps


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

    def poke(self) -> None:
        """Wake the consumer with nothing to take (it has other work: see _consume)."""
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
        state: StateSettings | None = None,
    ) -> None:
        self._settings = settings
        self._state_settings = state or StateSettings()
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
        self.snapshots = 0  # snapshots loaded
        self._no_snapshot_logged = False
        hub.state_idle_timeout = self._state_settings.idle_timeout
        self._pump: _Pump | None = None
        hub.on_state_wanted = self._state_wanted

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
                ("grpc.max_receive_message_length", s.max_message_bytes),
                # We do our own backoff with jitter; keep grpc's reconnects quick.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )

    def _subscribe(
        self, channel: grpc.Channel
    ) -> grpc.UnaryStreamMultiCallable[pb.SubscribeRequest, pb.SubscribeResponse]:
        # The generated stub would decode with SubscribeResponse.FromString, which fails
        # a whole batch (and, as resuming asks for it again, the stream for good) on one
        # event with a bad string. This decoder salvages the rest.
        return channel.unary_stream(
            SUBSCRIBE_METHOD,
            request_serializer=pb.SubscribeRequest.SerializeToString,
            response_deserializer=self._decode,
        )

    def _decode(self, data: bytes) -> pb.SubscribeResponse:
        response, bad = decode_response(data)
        if bad:
            self.malformed += bad
            log.warning("skipped %d undecodable upstream event(s)", bad)
        return response

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
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _OVERSIZED in reason:
                    received_before = -1 if self._skip_oversized() else received_before
            self.live = False
            if self.received != received_before:
                delay = s.reconnect_min
            pause = self._rng.uniform(delay / 2, delay)
            log.warning("upstream %s: %s; reconnecting in %.2fs", s.target, reason, pause)
            await trio.sleep(pause)
            delay = min(delay * 2, s.reconnect_max)

    def _skip_oversized(self) -> bool:
        """The next message is larger than ``max_message_bytes``: step over one event.

        Resuming from the same position would get the same message, and fail, forever.
        The shipped upstream sends an oversized event in a message of its own, so that
        event is the one skipped; an upstream that batches it with others costs one gap
        per event until the batch fits. Either way clients are told (``stream_gap``).
        """
        seq = self.sequencer
        if seq.log_id is None:
            return False
        after = format_id(seq.log_id, seq.last)
        seq.last += 1
        self.malformed += 1
        resume = Cursor(seq.log_id, seq.last + 1)
        self._hub.publish_gap(
            "upstream-oversized", after, format_id(seq.log_id, seq.last + 1), resume
        )
        return True

    async def _stream_once(self) -> None:
        channel = self._channel_factory(self._settings.target)
        self.connects += 1
        try:
            hub = self._hub
            if hub.state_in_use or hub.state_stale:  # else read when a stream asks for it
                await self._load_state(channel)
            request = pb.SubscribeRequest(
                after_sequence=self.sequencer.last, log_id=self.sequencer.log_id or ""
            )
            call = self._subscribe(channel)(request)
            pump = self._pump = _Pump(trio.lowlevel.current_trio_token())
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
            call = self._subscribe(channel)(request, timeout=self._settings.connect_timeout + 30)
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

    async def _load_state(self, channel: grpc.Channel) -> None:
        """Read the upstream's snapshot and give the hub the state it folds into.

        Decoding and folding happen in a worker thread, into a state of its own: the
        Trio thread only swaps it in. An upstream without ``Snapshot`` (UNIMPLEMENTED)
        is served as before, without state; any other failure fails this connection.
        """
        call = channel.unary_stream(
            SNAPSHOT_METHOD,
            request_serializer=pb.SnapshotRequest.SerializeToString,
            response_deserializer=pb.SnapshotResponse.FromString,
        )(
            pb.SnapshotRequest(max_event_bytes=MAX_EVENT_BYTES),
            timeout=self._settings.connect_timeout + 60,
        )
        error: grpc.RpcError | None = None
        state: State[Event] | None = None
        started = threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_exit, call, None)
            nursery.start_soon(self._snapshot_watchdog, call, started)
            try:
                state = await trio.to_thread.run_sync(
                    _read_snapshot,
                    call,
                    self._state_settings,
                    started,
                    limiter=self._fetch_limiter,
                )
            except grpc.RpcError as exc:
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNIMPLEMENTED:
                if not self._no_snapshot_logged:
                    self._no_snapshot_logged = True
                    log.warning(
                        "upstream %s has no Snapshot: initialState streams are refused",
                        self._settings.target,
                    )
                self._hub.no_state()
                return
            raise error
        if state is None or state.log_id is None:
            return
        if self.sequencer.log_id is None:
            # The first attach: live from exactly the position the state reflects.
            self.sequencer.attach(state.log_id, state.sequence)
        self.snapshots += 1
        self._hub.load_state(state)

    def _state_wanted(self) -> None:
        """The hub wants a state it does not hold: the consumer reads it at once (in
        its own round, so that nothing is published meanwhile), even with no event
        arriving to wake it."""
        if self._pump is not None:
            self._pump.poke()

    async def _snapshot_watchdog(self, call: grpc.Call, started: threading.Event) -> None:
        # As for subscriptions (_attach_watchdog): a peer that never answers is dropped.
        await trio.sleep(self._settings.connect_timeout)
        if not started.is_set():
            log.warning("upstream %s: no snapshot within %.1fs", self._settings.target,
                        self._settings.connect_timeout)  # fmt: skip
            call.cancel()  # type: ignore[no-untyped-call]

    async def _reload_state(self) -> None:
        """The hub wants a state it does not hold (none yet, or events went missing
        that it does not hold): read it from the upstream."""
        channel = self._channel_factory(self._settings.target)
        try:
            await self._load_state(channel)
        except grpc.RpcError as exc:
            log.warning("state reload from %s failed: %s", self._settings.target, _details(exc))
        finally:
            channel.close()

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
        hub = self._hub
        while True:
            responses = await pump.take()
            # One round: what piled up is published, then written to each direct client
            # in one write (Hub.batch), however many upstream messages it came in.
            start = 0
            while start < len(responses):
                published = 0
                with hub.batch():
                    while start < len(responses) and published < PUBLISH_ROUND:
                        self._apply(responses[start])
                        published += len(responses[start].events)
                        start += 1
                if start < len(responses):
                    # Let client writers drain before publishing more, so a burst that
                    # piled up in the pump is not mistaken for a client being slow.
                    await trio.lowlevel.checkpoint()
            if hub.state_stale and not hub.state_unavailable:
                await self._reload_state()

    def _apply_all(self, responses: list[pb.SubscribeResponse]) -> None:
        with self._hub.batch():
            for response in responses:
                self._apply(response)

    def _apply(self, response: pb.SubscribeResponse) -> None:
        self._attached = True
        if not self.live:
            self.live = True
            log.info("upstream %s: stream live", self._settings.target)
        log_id = _safe_log_id(response.log_id)
        self.sequencer.attach(log_id, response.head_sequence)
        self._hub.attach(log_id, self.sequencer.last)
        self.received += len(response.events)
        small = _within_event_limit(response)
        events: list[Event] = []
        for msg in response.events:
            try:
                events.append(from_proto(msg, small=small))
            except MalformedEvent as exc:
                self.malformed += 1
                log.warning("skipping malformed upstream event: %s", exc)
        skip, gaps = self.sequencer.accept(log_id, [e.sequence for e in events])
        start = skip
        for index, gap in gaps:
            if index > start:
                self._hub.publish(log_id, events[start:index])
            # Where the log goes on: the next event, or (none yet) its start.
            resume = Cursor(log_id, events[index].sequence if index < len(events) else 1)
            self._hub.publish_gap(gap.reason, gap.after, gap.before, resume)
            start = index
        if start < len(events):
            self._hub.publish(log_id, events[start:])


def _read_snapshot(
    call: grpc.Call, settings: StateSettings, started: threading.Event
) -> State[Event] | None:
    """Worker thread: read a whole snapshot and fold it into a new state."""
    state = new_state(settings.retention, settings.max_entities)
    position: int | None = None
    try:
        for response in call:  # type: ignore[attr-defined]
            started.set()
            if position is None:
                position = response.sequence
                state.reset(_safe_log_id(response.log_id), position)
            for msg in response.events:
                try:
                    state.apply(from_proto(msg))
                except MalformedEvent as exc:
                    log.warning("skipping malformed snapshot event: %s", exc)
            if response.last:
                break
    finally:
        call.cancel()  # type: ignore[no-untyped-call]
    if position is None:
        return None
    state.sequence = position  # the snapshot's position, whatever its last event
    return state


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


def _within_event_limit(response: pb.SubscribeResponse) -> bool:
    """True if no event in ``response`` can be larger than MAX_EVENT_BYTES (cheaply).

    An event is never larger than the response that carries it, and measuring a
    response costs about half of measuring each of its events; so a batch is measured
    whole when, judging by its first event, it may well be within the limit. Either
    way an event is refused if and only if it is too large: this only picks the
    cheaper way to find out.
    """
    events = response.events
    return (
        len(events) > 1
        and len(events) * events[0].ByteSize() <= MAX_EVENT_BYTES
        and response.ByteSize() <= MAX_EVENT_BYTES
    )


def decode_response(data: bytes) -> tuple[pb.SubscribeResponse, int]:
    """Decode a response, keeping every event that decodes; count those that do not.

    Pure. A batch is normally decoded in one call; only when that fails are its fields
    walked one by one (as unknown fields of an empty message) to isolate the bad ones.
    """
    try:
        return pb.SubscribeResponse.FromString(data), 0
    except DecodeError:
        pass
    shell = empty_pb2.Empty()
    shell.ParseFromString(data)  # a batch that is not protobuf at all still raises
    response = pb.SubscribeResponse()
    bad = 0
    fields = UnknownFieldSet(shell)
    for i in range(len(fields)):
        field = fields[i]
        number, value = field.field_number, field.data
        if number == _EVENTS_FIELD and isinstance(value, bytes):
            try:
                response.events.append(pb.LifecycleEvent.FromString(value))
            except DecodeError:
                bad += 1
        elif number == _LOG_ID_FIELD and isinstance(value, bytes):
            response.log_id = value.decode("utf-8", "replace")
        elif number == _OLDEST_FIELD and isinstance(value, int):
            response.oldest_sequence = value
        elif number == _HEAD_FIELD and isinstance(value, int):
            response.head_sequence = value
    return response, bad


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
