"""The hub: decode once, encode once, index recipients, fill bounded outboxes.

Everything here is synchronous and runs in the Trio thread, so subscribing (replaying
history into a new outbox, then registering it) is atomic with respect to publishing:
replayed and live events can never interleave out of order.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from operator import attrgetter
from typing import Final, NamedTuple

import trio

from . import sse
from .direct import ChunkSink, chunk
from .eventid import Cursor, format_id, id_prefix
from .events import Event
from .payloads import JSON_ENCODERS, Payload
from .policy import Filters, IndexKey, Principal, index_key, visible
from .state import State

log = logging.getLogger(__name__)

# Subscribers who see the same events: the same principal with the same filters.
Audience = tuple[Principal, Filters]
# Each index kind and the event field its bucket value comes from: exactly the keys of
# policy.event_keys (a property test checks they agree), read without building them.
_EVENT_FIELDS: Final[tuple[tuple[str, Callable[[Event], str]], ...]] = (
    ("uuid", attrgetter("session_uuid")),
    ("session", attrgetter("session_id")),
    ("owner", attrgetter("owner_access_key")),
    ("user", attrgetter("user_id")),
    ("group", attrgetter("group_name")),
    ("domain", attrgetter("domain_name")),
    ("all", lambda event: ""),
)

PING: Final = sse.encode_comment("ping")
GAP_EVENT: Final = "stream_gap"
OVERFLOW_EVENT: Final = "stream_overflow"
SERVER_CLOSE_EVENT: Final = "server_close"
STATE_BEGIN_EVENT: Final = "stream_state_begin"
STATE_END_EVENT: Final = "stream_state_end"
# Held back until the state is there: every event of the log (skip_until).
_ALL: Final = 2**64
_API_LABELS: Final = {payload: payload.generation.name.lower() for payload in Payload}
# Hub.publish keeps an event's frames in a list indexed by Payload, literally
# [v4, None, None, None]: another payload must widen it there.
assert len(Payload) == 4


class _Entry(NamedTuple):
    """One retained frame. ``event`` is None for stream-level notices (gaps).

    A named tuple: one is made per event, and a frozen dataclass takes twice as long.
    """

    log_id: str
    sequence: int
    event: Event | None
    frame: bytes


class StateWrite(NamedTuple):
    """A state a stream is to write before anything else: the table as it was at
    ``sequence`` of ``log_id`` (a copy of references: the live table moves on)."""

    reason: str  # "initial" or "resync"
    events: list[Event]
    log_id: str
    sequence: int


class Outbox:
    """A client's bounded queue of encoded frames; the writer takes all at once.

    Two ways out. Normally the client's task waits in ``take``. When the stream can be
    written directly (``attach``: see direct.py), the hub writes queued frames itself
    at the end of each round (``flush``), and the task only runs while ``busy``: when
    the socket is full (``stalled``), for a catch-up, and to finish a closed stream.
    """

    __slots__ = (
        "_beats",
        "_flushq",
        "_frames",
        "_limit",
        "_waiter",
        "_woken",
        "busy",
        "closed",
        "last_activity",
        "reason",
        "sent",
        "since",
        "sink",
        "stalled",
        "taken_beats",
    )

    def __init__(self, limit: int) -> None:
        self._frames: list[bytes] = []
        self._limit = limit
        # The client's task while it waits in take/idle (only it ever waits here): a
        # task reference, not a ParkingLot, which was 1.2 KiB of every idle stream.
        self._waiter: trio.lowlevel.Task | None = None
        self._woken = False
        self.closed = False
        self.reason = ""
        self.since = 0.0  # when the oldest queued frame arrived (time.monotonic)
        self.last_activity = time.monotonic()  # when the writer last took frames
        self._beats = 0  # heartbeat frames among the queued ones
        self.taken_beats = 0  # ...among those the last take() returned
        self.sent = 0  # frames written, heartbeats not counted
        # Direct writes (attach): the hub's list of outboxes to flush, the sink, and
        # whether the client's task owns the socket right now.
        self._flushq: list[Outbox] | None = None
        self.sink: ChunkSink | None = None
        self.busy = True
        self.stalled = b""  # framed bytes the socket did not take: the task writes them

    def __len__(self) -> int:
        return len(self._frames)

    def attach(self, sink: ChunkSink, flushq: list[Outbox]) -> None:
        """Direct mode from now on; the task keeps the socket (busy) until it parks."""
        self.sink = sink
        self._flushq = flushq
        self.busy = True

    def _queued(self) -> None:
        """The first frame arrived in an empty outbox: see that it gets written."""
        self.since = time.monotonic()
        if self._flushq is not None and not self.busy:
            self._flushq.append(self)
        else:
            self._wake()

    def put(self, frame: bytes) -> bool:
        """Queue a frame; False if the outbox is full (the client is too slow)."""
        if self.closed:
            return True
        frames = self._frames
        if len(frames) >= self._limit:
            return False
        frames.append(frame)
        if len(frames) == 1:
            self._queued()
        return True

    def preload(self, frames: Sequence[bytes]) -> None:
        """Queue a replay backlog; bounded by the hub's history, not by the limit."""
        if frames and not self._frames:
            self.since = time.monotonic()
        self._frames.extend(frames)

    def close(self, reason: str, final: bytes | None = None) -> None:
        """Stop accepting frames; the writer sends what is queued (plus ``final``)."""
        if self.closed:
            return
        if final is not None:
            self._frames.append(final)
        self.closed = True
        self.reason = reason
        self.hand_over()

    def hand_over(self) -> None:
        """Give the socket back to the client's task (catch-up, stall, close)."""
        self.busy = True
        self._wake()

    def _wake(self) -> None:
        task, self._waiter = self._waiter, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def interrupt(self) -> None:
        """Wake the client's task with nothing queued (a state to write): it owns the
        socket until it idles again."""
        self._woken = True
        self.hand_over()

    def beat(self, frame: bytes) -> None:
        """Queue a heartbeat (not an event: ``taken_beats`` tells the writer)."""
        self._frames.append(frame)
        self._beats += 1
        if len(self._frames) == 1:
            self._queued()

    def discard(self) -> None:
        self._frames.clear()

    def take_now(self, now: float | None = None) -> list[bytes]:
        """Everything queued, at once (counting the events among it as sent)."""
        frames, self._frames = self._frames, []
        self.taken_beats, self._beats = self._beats, 0
        self.sent += len(frames) - self.taken_beats
        self.last_activity = time.monotonic() if now is None else now
        return frames

    async def take(self) -> list[bytes]:
        """Wait until there is something to write (or the outbox closed); take it all."""
        while not self._frames and not self.closed and not self._woken:
            self._waiter = trio.lowlevel.current_task()  # for _wake (one waiter: this)
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        self._woken = False
        return self.take_now()

    async def idle(self) -> None:
        """Direct mode: let the hub write, until it hands the socket back."""
        self.busy = False
        while not self.busy:
            # Parked inline, not in a helper: every idle stream waits here, and each
            # coroutine frame it holds is a few hundred bytes.
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)

    def flush(self, now: float, framed: dict[bytes, bytes]) -> float | None:
        """Direct mode: write what is queued now, without waiting.

        Returns how long the oldest frame waited, or None if nothing was written. What
        the socket does not take, and everything while the task is busy, is left to
        the task. ``framed``: the round's chunk-framed copies of single frames, shared
        by the outboxes flushed in it (in a fan-out they all hold the same one).
        """
        if self.busy or not self._frames or self.sink is None:
            return None
        waited = now - self.since
        frames = self.take_now(now)
        if len(frames) == 1:
            data = framed.get(frames[0])
            if data is None:
                data = framed[frames[0]] = chunk(frames[0])
        else:
            data = chunk(b"".join(frames))
        try:
            rest = self.sink.try_write(data)
        except OSError:
            self.close("client-gone")
            return None
        if rest:
            self.stalled = rest
            self.hand_over()
        return waited


class Subscription:
    __slots__ = (
        "catchup",
        "epoch",
        "filters",
        "follows_state",
        "key",
        "outbox",
        "positions",
        "principal",
        "resume",
        "resync_due",
        "skip_log",
        "skip_until",
        "state_write",
    )

    def __init__(
        self,
        principal: Principal,
        filters: Filters,
        outbox: Outbox,
        positions: bool = False,
        follows_state: bool = False,
    ) -> None:
        self.principal = principal
        self.filters = filters
        self.outbox = outbox
        # Whether its heartbeats carry the stream position (text/event-stream clients).
        self.positions = positions
        self.key: IndexKey = index_key(principal, filters)
        self.resume: Cursor | None = None
        # Events (cursor, up to this sequence] must be fetched from the upstream and
        # written before anything in the outbox: they predate it.
        self.catchup: tuple[Cursor, int] | None = None
        # Set when a client resumed from a position this proxy had not published yet:
        # events up to it are ones the client already has.
        self.skip_log: str | None = None
        self.skip_until = 0
        # initialState=true: a state instead of every gap (stream_state_begin ... end).
        self.follows_state = follows_state
        self.state_write: StateWrite | None = None  # to be written before anything else
        self.resync_due: str | None = None  # a state is owed once the hub has one
        self.epoch = 0  # +1 per state: what was taken from the outbox before is old news


class Subscribed:
    """``Hub.subscribe``'s context manager: registers on entry, unregisters on exit.

    A class rather than a ``@contextmanager`` generator, whose suspended frame and
    wrapper every stream kept for as long as it was open (0.6 KiB each)."""

    __slots__ = ("_hub", "_request", "_sub")

    def __init__(
        self,
        hub: Hub,
        principal: Principal,
        filters: Filters,
        after: Cursor | None,
        positions: bool,
        state: bool,
    ) -> None:
        self._hub = hub
        self._request: tuple[Principal, Filters, Cursor | None, bool, bool] | None = (
            principal,
            filters,
            after,
            positions,
            state,
        )
        self._sub: Subscription | None = None

    def __enter__(self) -> Subscription:
        assert self._request is not None, "a subscription is entered once"
        request, self._request = self._request, None
        self._sub = self._hub._register(*request)
        return self._sub

    def __exit__(self, *_: object) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            self._hub._unregister(sub)


def encode(log_id: str, event: Event, payload: Payload = Payload.V4) -> bytes:
    """The one SSE frame for an upstream event in one API generation's shape, shared by
    every recipient of that generation."""
    return _encode(id_prefix(log_id), event, payload)


def _encode(prefix: str, event: Event, payload: Payload = Payload.V4) -> bytes:
    """``encode``, given the log's ``id_prefix`` (made once per published batch)."""
    return sse.encode_json_event_numbered(
        event.name, JSON_ENCODERS[payload](event), prefix, event.sequence
    )


def gap_frame(reason: str, after: str | None, before: str | None) -> bytes:
    """The explicit notice that events between two positions may be missing."""
    data = json.dumps({"reason": reason, "after": after, "before": before}, separators=(",", ":"))
    return sse.encode_event(GAP_EVENT, data)


def state_begin_frame(reason: str) -> bytes:
    return sse.encode_event(STATE_BEGIN_EVENT, json.dumps({"reason": reason}))


def state_end_frame(log_id: str, sequence: int, entities: int) -> bytes:
    """The end of a state: its position (resume from here) and how many entities."""
    return sse.encode_event(
        STATE_END_EVENT, json.dumps({"entities": entities}), format_id(log_id, sequence)
    )


def new_state(retention: float = 3600.0, max_entities: int = 100_000) -> State[Event]:
    """An empty state of ``Event`` values (the proxy's view; see state.py)."""
    return State(retention=retention, max_entities=max_entities, stamp=attrgetter("timestamp"))


class Hub:
    def __init__(self, *, history_size: int, outbox_limit: int) -> None:
        # The recipient index: bucket kind -> value -> audience (who, with which
        # filters) -> its subscriptions. ``visible`` is decided once per audience. An
        # event is looked up by its value for each kind (``_EVENT_FIELDS``, the same
        # keys as ``policy.event_keys``), in the kinds that have subscribers at all.
        self._index: dict[str, dict[str, dict[Audience, set[Subscription]]]] = {
            kind: {} for kind, _ in _EVENT_FIELDS
        }
        self._history: deque[_Entry] = deque(maxlen=history_size or None)
        self._history_size = history_size
        self._outbox_limit = outbox_limit
        self.log_id: str | None = None
        self.last_sequence = 0
        # Insertion-ordered, so that a client leaving while pending is removed in O(1):
        # a storm of reconnects level with this proxy fills it.
        self._pending: dict[Subscription, None] = {}
        self.closing = False
        self.heartbeat_interval = 0.0  # set by run_heartbeats
        # Spreads each new stream's first heartbeat over the interval. Its own
        # generator: the hub never draws from (or disturbs) the global one.
        self._jitter = random.Random()
        # Plain counters, read by the metrics collector at scrape time.
        self.clients = 0
        self.clients_by_role: Counter[str] = Counter()
        # By API generation ("v4", "v5": the payload its clients get).
        self.clients_by_api: Counter[str] = Counter()
        self.streams_opened: Counter[str] = Counter()
        self.published = 0
        self.delivered = 0  # frames queued for clients
        self.refused = 0  # frames refused because a client's outbox was full
        self.dropped_clients = 0  # clients disconnected for being too slow
        self.direct_streams = 0  # streams written directly (direct.py) since start
        self.direct_stalls = 0  # direct writes the socket took only part of
        # Direct-mode outboxes that got frames this round (Outbox.flush), and whether a
        # round is open (batch): then they are written once, when it ends.
        self._flushq: list[Outbox] = []
        self._batching = 0
        # Called with each direct write's queueing delay (metrics' latency histogram).
        self.on_write: Callable[[float], None] | None = None
        # Where every session stands (state.py): loaded from the upstream's snapshot
        # (load_state), then kept current by publish. None until the first load.
        self.state: State[Event] | None = None
        # The upstream has no snapshot to give: initialState streams are refused.
        self.state_unavailable = False
        # Events went missing that the state does not hold: the bridge reloads it.
        self.state_stale = False
        self._followers: set[Subscription] = set()
        self._state_lot = trio.lowlevel.ParkingLot()  # wait_state: a state is loaded
        self.state_writes = 0  # states handed to streams (initial and resync)
        # Folding every event costs the ingest path (state.py), so the state is kept
        # only while it is used: past state_idle_timeout seconds without a stream that
        # follows it or a read of it, it is dropped, and read again from the upstream
        # when next wanted (on_state_wanted wakes the bridge). 0: kept for good.
        self.state_idle_timeout = 0.0
        self._state_used = time.monotonic()
        self.on_state_wanted: Callable[[], None] | None = None
        self.state_reads = 0  # states given as JSON (GET <stream path>/state)

    # -- direct writes -----------------------------------------------------------

    def attach_sink(self, sub: Subscription, sink: ChunkSink) -> None:
        """Write this subscriber's frames from the hub from now on (see direct.py)."""
        sub.outbox.attach(sink, self._flushq)
        self.direct_streams += 1

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Publish several times, write to direct clients once, when the batch ends."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching:
                self.flush()

    def flush(self) -> None:
        """Write every direct client's queued frames: one send each, no task switch."""
        queue = self._flushq  # the list every attached outbox appends itself to
        if not queue:
            return
        on_write = self.on_write
        now = time.monotonic()
        framed: dict[bytes, bytes] = {}
        for outbox in queue:  # flushing never queues: nothing is added meanwhile
            waited = outbox.flush(now, framed)
            if waited is not None:
                if on_write is not None:
                    on_write(waited)
                if outbox.stalled:
                    self.direct_stalls += 1
        queue.clear()

    # -- subscribers -------------------------------------------------------------

    def subscribe(
        self,
        principal: Principal,
        filters: Filters,
        after: Cursor | None = None,
        *,
        positions: bool = False,
        state: bool = False,
    ) -> Subscribed:
        """Register a client for as long as the ``with`` block runs.

        ``state``: the stream follows state (initialState=true). Without ``after`` it
        starts with the state; a resume that would be a gap becomes a resync.
        """
        return Subscribed(self, principal, filters, after, positions, state)

    def _register(
        self,
        principal: Principal,
        filters: Filters,
        after: Cursor | None,
        positions: bool,
        state: bool,
    ) -> Subscription:
        sub = Subscription(principal, filters, Outbox(self._outbox_limit), positions, state)
        if self.heartbeat_interval:
            sub.outbox.last_activity -= self._jitter.random() * self.heartbeat_interval
        if after is not None:
            self._replay(sub, after)
        elif state:
            self._start_state(sub, "initial")
        if state:
            self._followers.add(sub)
        if self.closing:
            sub.outbox.close("shutdown", _server_close_frame())
        kind, value = sub.key
        groups = self._index[kind].setdefault(value, {})
        groups.setdefault((principal, filters), set()).add(sub)
        api = _API_LABELS[filters.payload]
        self.clients += 1
        self.clients_by_role[principal.role.value] += 1
        self.clients_by_api[api] += 1
        self.streams_opened[api] += 1
        return sub

    def _unregister(self, sub: Subscription) -> None:
        principal, filters = sub.principal, sub.filters
        self.clients -= 1
        self.clients_by_role[principal.role.value] -= 1
        self.clients_by_api[_API_LABELS[filters.payload]] -= 1
        kind, value = sub.key
        buckets = self._index[kind]
        groups = buckets[value]
        audience = (principal, filters)
        members = groups[audience]
        members.discard(sub)
        if not members:
            del groups[audience]
            if not groups:
                del buckets[value]
        if sub.resume is not None:
            del self._pending[sub]
        if sub.follows_state:
            self._followers.discard(sub)
            self._state_used = time.monotonic()
        sub.outbox.discard()

    def _replay(self, sub: Subscription, after: Cursor) -> None:
        state = self.state
        if sub.follows_state and state is not None and state.log_id not in (None, after.log_id):
            # The state is of another log (the upstream started a new one, maybe before
            # this proxy published anything of it): nothing resumes across that.
            self._start_state(sub, "resync")
            return
        if self.log_id is None or (
            after.log_id == self.log_id and after.sequence >= self.last_sequence
        ):
            # Level with or ahead of this proxy (the client came from a replica further
            # along, or this proxy has not heard from the upstream yet): whether anything
            # in between is missing is decided at the next publish.
            sub.resume = after
            self._pending[sub] = None
            return
        history = self._history
        start: int | None = None
        first_of_log: int | None = None  # index of the oldest retained event of its log
        for i in range(len(history) - 1, -1, -1):
            entry = history[i]
            if entry.event is None or entry.log_id != after.log_id:
                continue
            if entry.sequence <= after.sequence:
                start = i + 1
                break
            first_of_log = i
        frames: list[bytes] = []
        if start is None:
            if first_of_log is not None:
                # The client's log is still here, but its position is older than what
                # this proxy retains: the writer fetches the rest from the upstream.
                oldest = history[first_of_log]
                if oldest.sequence > after.sequence + 1:
                    sub.catchup = (after, oldest.sequence - 1)
                start = first_of_log
            elif after.log_id == self.log_id:
                sub.catchup = (after, self.last_sequence)
                start = len(history)
            else:
                # A log neither this proxy nor (as far as it knows) the upstream holds.
                oldest_entry = next((e for e in history if e.event is not None), None)
                before = (
                    format_id(oldest_entry.log_id, oldest_entry.sequence) if oldest_entry else None
                )
                if sub.follows_state:
                    self._start_state(sub, "resync")
                    return
                frames.append(gap_frame("history-exhausted", str(after), before))
                start = 0
        payload = sub.filters.payload
        for i in range(start, len(history)):
            entry = history[i]
            if entry.event is None:
                if sub.follows_state:
                    # Events after its position may be missing: a state instead.
                    self._start_state(sub, "resync")
                    return
                frames.append(entry.frame)
            elif visible(sub.principal, sub.filters, entry.event):
                frames.append(
                    entry.frame
                    if payload is Payload.V4
                    else encode(entry.log_id, entry.event, payload)
                )
        sub.outbox.preload(frames)

    def _settle_pending(self, log_id: str, first: Event) -> None:
        for sub in self._pending:
            cursor, sub.resume = sub.resume, None
            if cursor is None or sub.outbox.closed:
                continue
            if cursor.log_id != log_id:
                if sub.follows_state:
                    self._start_state(sub, "resync")
                elif not sub.outbox.put(
                    gap_frame("upstream-restarted", str(cursor), format_id(log_id, first.sequence))
                ):
                    self._drop_slow(sub)
            elif first.sequence <= cursor.sequence + 1:
                sub.skip_log, sub.skip_until = log_id, cursor.sequence
            else:
                # This proxy started after the client's position: fetch the difference.
                sub.catchup = (cursor, first.sequence - 1)
                sub.outbox.hand_over()
        self._pending.clear()

    # -- publishing --------------------------------------------------------------

    def attach(self, log_id: str, head: int) -> None:
        """The upstream's position when this proxy first attached, before any event."""
        if self.log_id is None:
            self.log_id, self.last_sequence = log_id, head

    def publish(self, log_id: str, events: Sequence[Event]) -> None:
        """Deliver consecutive events of one upstream log to every matching client."""
        if events and self._pending:
            self._settle_pending(log_id, events[0])
        # (buckets, value of the event) per kind that has any subscriber, found once.
        kinds = [(self._index[kind], field) for kind, field in _EVENT_FIELDS if self._index[kind]]
        delivered = 0
        keep = self._history.append if self._history_size else None
        prefix = id_prefix(log_id)
        state = self.state
        if state is not None and state.log_id != log_id and events:
            state = None
            self.state_stale = True  # a log the state is not of: the bridge reloads
        for event in events:
            if state is not None and event.sequence > state.sequence:
                state.apply(event)
            # The history's (and v4's) frame; other payloads' on first use.
            frame = _encode(prefix, event)
            frames: list[bytes | None] = [frame, None, None, None]
            if keep is not None:
                keep(_Entry(log_id, event.sequence, event, frame))
            for buckets, field in kinds:
                groups = buckets.get(field(event))
                if groups is None:
                    continue
                for (principal, filters), members in groups.items():
                    if not visible(principal, filters, event):
                        continue
                    shaped = frames[filters.payload]
                    if shaped is None:
                        shaped = frames[filters.payload] = _encode(prefix, event, filters.payload)
                    for sub in members:
                        if sub.skip_log is not None:
                            if sub.skip_log == log_id and event.sequence <= sub.skip_until:
                                continue
                            sub.skip_log = None
                        if sub.outbox.put(shaped):
                            delivered += 1
                        else:
                            self._drop_slow(sub)
        self.delivered += delivered
        if events:
            self.log_id = log_id
            self.last_sequence = events[-1].sequence
            self.published += len(events)
        if not self._batching:
            self.flush()

    def publish_gap(
        self,
        reason: str,
        after: str | None,
        before: str | None,
        resume: Cursor | None = None,
    ) -> None:
        """Tell every client that events between two positions may be missing.

        ``resume``: where the log goes on after the gap (None: unknown). Streams that
        follow state get a resync instead, unless their state already covers it; when
        not even the hub's state does, they wait for the bridge to reload it.
        """
        frame = gap_frame(reason, after, before)
        log.warning("stream gap (%s): after %s, before %s", reason, after, before)
        if self._history_size:
            self._history.append(_Entry(self.log_id or "", self.last_sequence, None, frame))
        state = self.state
        if state is not None and not _covers(state.log_id, state.sequence, resume):
            self.state_stale = True
        for sub in self._subscriptions():
            if sub.follows_state:
                if not _covers(sub.skip_log, sub.skip_until, resume):
                    self._start_state(sub, "resync")
            elif not sub.outbox.put(frame):
                self._drop_slow(sub)
        if not self._batching:
            self.flush()

    # -- state -------------------------------------------------------------------

    def load_state(self, state: State[Event]) -> None:
        """A state read from the upstream (a snapshot, folded): it replaces the hub's.

        It may be ahead of what the hub has published: events up to its position are
        then published to streams but not folded again. Streams owed a state get it
        now; every stream that follows state gets a resync if the log changed.
        """
        old = self.state
        self.state = state
        self.state_unavailable = False
        self.state_stale = False
        self._state_lot.unpark_all()
        changed = old is not None and old.log_id != state.log_id
        for sub in list(self._followers):
            if sub.resync_due is not None:
                self._start_state(sub, sub.resync_due)
            elif changed:
                self._start_state(sub, "resync")
        if not self._batching:
            self.flush()

    def no_state(self) -> None:
        """The upstream cannot give a snapshot: streams waiting for one are closed."""
        self.state_unavailable = True
        self._state_lot.unpark_all()
        for sub in list(self._followers):
            if sub.resync_due is not None:
                sub.outbox.close("state-unavailable", _server_close_frame("state-unavailable"))

    def resync(self, sub: Subscription) -> None:
        """Give a stream a fresh state instead of a gap (a failed catch-up)."""
        self._start_state(sub, "resync")

    def _start_state(self, sub: Subscription, reason: str) -> None:
        """Hand a stream the state, atomically with what it receives next.

        What it has queued is older than the state and goes; events up to the state's
        position are skipped when published (the state may be ahead of the hub), so
        the live events after it come from exactly that position.
        """
        sub.outbox.discard()
        sub.catchup = None
        sub.epoch += 1
        view = self.state_view(reason)
        if view is None:
            # Owed once the bridge (re)loads the state; until then nothing goes out.
            sub.resync_due, sub.state_write = reason, None
            sub.skip_log, sub.skip_until = self.log_id or "", _ALL
            self.want_state()
            return
        sub.resync_due = None
        sub.state_write = view
        sub.skip_log, sub.skip_until = view.log_id, view.sequence
        self.state_writes += 1
        sub.outbox.interrupt()

    def want_state(self) -> None:
        """Something needs the state now: keep it, or have the bridge read it."""
        self._state_used = time.monotonic()
        if self.state is None and not self.state_unavailable:
            self.state_stale = True  # the bridge reads it at its next round
            if self.on_state_wanted is not None:
                self.on_state_wanted()

    @property
    def state_in_use(self) -> bool:
        """Is the state kept (followed, read lately, or kept for good)?"""
        return self.state is not None or not self.state_idle_timeout

    def drop_idle_state(self, now: float) -> bool:
        """Stop folding a state nothing has used for ``state_idle_timeout`` seconds."""
        if (
            self.state is None
            or not self.state_idle_timeout
            or self._followers
            or now - self._state_used < self.state_idle_timeout
        ):
            return False
        self.state = None
        self.state_stale = False
        log.info(
            "state: unused for %.0f s, no longer kept (read from the upstream again when "
            "a stream asks for initialState)",
            self.state_idle_timeout,
        )
        return True

    def state_view(self, reason: str = "initial") -> StateWrite | None:
        """The state as it is now (a copy of the table's references: the live table
        moves on), or None while there is none to give: not loaded yet, stale (events
        went missing that it does not hold), or the upstream has none."""
        state = self.state
        if state is None or state.log_id is None or self.state_stale:
            return None
        return StateWrite(reason, state.events(), state.log_id, state.sequence)

    async def wait_state(self) -> StateWrite | None:
        """``state_view`` once there is one (None if the upstream has no snapshot);
        the caller bounds the wait."""
        while (view := self.state_view()) is None and not self.state_unavailable:
            await self._state_lot.park()
        return view

    def _subscriptions(self) -> Iterator[Subscription]:
        for buckets in self._index.values():
            for groups in buckets.values():
                for members in groups.values():
                    yield from members

    def position(self) -> str | None:
        """The id of the newest event published, if any."""
        return format_id(self.log_id, self.last_sequence) if self.log_id else None

    def settled(self, sub: Subscription) -> bool:
        """Has this subscriber been handed everything published so far?"""
        return (
            sub.catchup is None
            and sub.resume is None
            and sub.skip_log is None
            and sub.state_write is None
            and not len(sub.outbox)
        )

    def _drop_slow(self, sub: Subscription) -> None:
        self.refused += 1
        self.dropped_clients += 1
        # Its queued frames stay: it gets everything up to the overflow, then the reason,
        # then a clean close; its reconnect resumes from the last id it received.
        data = json.dumps({"reason": "client-too-slow", "limit": self._outbox_limit})
        sub.outbox.close("overflow", sse.encode_event(OVERFLOW_EVENT, data))
        log.info("dropping slow client %s (outbox full)", sub.principal.access_key)

    async def run_heartbeats(self, interval: float) -> None:
        """Every client's heartbeat, from one task.

        A timer per client (a cancel scope around each wait) costs every write a few
        microseconds and every idle connection a deadline; one sweep a fraction of the
        interval costs a pass over the clients instead, and nothing per write.
        """
        self.heartbeat_interval = interval
        # Clients that connected together would otherwise beat together: a burst of
        # writes every interval. Each one's first beat comes somewhere in the first
        # interval (see subscribe), and the sweep runs often enough to keep them apart.
        tick = max(min(interval / 8, 1.0), 0.01)
        while True:
            await trio.sleep(tick)
            now = time.monotonic()
            due = now - interval
            for sub in self._subscriptions():
                outbox = sub.outbox
                if outbox.last_activity > due or len(outbox) or outbox.closed:
                    continue
                if sub.catchup is not None:
                    continue
                # The heartbeat also carries the position when nothing is pending
                # for this client, so a narrow filter does not leave its cursor far
                # behind.
                position = self.position() if sub.positions and self.settled(sub) else None
                outbox.beat(sse.encode_position(position, "ping") if position else PING)
                outbox.last_activity = now
            self.flush()
            self.drop_idle_state(now)

    def revoke(self, access_keys: set[str]) -> int:
        """Close the streams of credentials that were revoked or changed."""
        closed = 0
        for sub in self._subscriptions():
            if sub.principal.access_key in access_keys and not sub.outbox.closed:
                sub.outbox.close("revoked", _server_close_frame("credentials-revoked"))
                closed += 1
        return closed

    def close(self) -> None:
        """Shutdown: every client gets ``server_close`` after what it has queued."""
        self.closing = True
        for sub in self._subscriptions():
            sub.outbox.close("shutdown", _server_close_frame())


def _covers(log_id: str | None, sequence: int, resume: Cursor | None) -> bool:
    """Does a state at (log_id, sequence) hold everything before ``resume``?"""
    return resume is not None and resume.log_id == log_id and resume.sequence <= sequence + 1


def _server_close_frame(reason: str = "server-shutdown") -> bytes:
    return sse.encode_event(SERVER_CLOSE_EVENT, json.dumps({"reason": reason}))
