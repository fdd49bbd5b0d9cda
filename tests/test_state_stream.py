"""State, then changes, through the real hub and writer: a property over histories.

A client with initialState=true connects at random points, drops and reconnects
(with the last id it received), while the proxy restarts (a new hub, loaded from the
upstream's snapshot, with an empty history) and the upstream starts new logs. After
every step its latest-event-per-entity map must equal the map of a client that
received every visible event of the current log from its start (independent policy,
tests/test_policy.py), and nothing it was shown may be an event it may not see.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Hashable
from contextlib import ExitStack
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.eventid import Cursor, parse_id
from proxy.events import Event
from proxy.hub import Hub, Subscription, new_state
from proxy.payloads import Payload
from proxy.policy import Filters, Principal, Role
from proxy.state import fold
from proxy.stream import StreamWriter
from proxy.upstream import Fetched, Gap

from .helpers import parse_block
from .test_policy import principals, reference_visible
from .test_state import client_key, raw_events, reference_map, rendered, stream_filters

Ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.lists(raw_events, min_size=1, max_size=8)),
        st.tuples(st.sampled_from(["connect", "drop", "restart", "new-log"]), st.none()),
    ),
    max_size=25,
)


class Upstream:
    """The logs as the upstream holds them (every event, for catch-ups)."""

    def __init__(self) -> None:
        self.log_id = "log0"
        self.events: list[Event] = []
        self.every_event: list[Event] = []  # of every log
        self.incarnation = 0

    def new_log(self) -> None:
        self.incarnation += 1
        self.log_id, self.events = f"log{self.incarnation}", []

    def snapshot(self) -> Any:
        state = fold(self.events, retention=1e9, max_entities=10**6, stamp=lambda e: 0.0)
        state.log_id, state.sequence = self.log_id, len(self.events)
        return state

    async def fetch(self, log_id: str, after: int, until: int) -> Fetched:
        if log_id != self.log_id:
            return Fetched([], until, Gap("upstream-restarted", None, None))
        return Fetched([e for e in self.events if after < e.sequence <= until], until)


class Client:
    def __init__(self, principal: Principal, filters: Filters) -> None:
        self.principal, self.filters = principal, filters
        self.map: dict[Hashable, tuple[str, dict[str, Any]]] = {}
        self.last_id: str | None = None
        self.shown: list[tuple[str, dict[str, Any]]] = []
        self.sub: Subscription | None = None
        self.stack = ExitStack()

    def apply(self, data: bytes) -> None:
        for block in data.split(b"\n\n")[:-1]:
            frame = parse_block(block)
            if frame.id is not None:
                self.last_id = frame.id
            if frame.event == "stream_state_begin":
                self.map.clear()
            elif frame.event == "stream_gap":
                raise AssertionError("a state-following stream got a gap")
            elif frame.is_event and frame.event != "stream_state_end":
                assert frame.event is not None
                item = (frame.event, frame.data)
                self.shown.append(item)
                self.map[client_key(frame.event, frame.data, self.filters.payload)] = item


async def drain(writer: StreamWriter, client: Client) -> None:
    """What the client's writer task would write now (state, catch-up, queued)."""
    sub = client.sub
    assert sub is not None
    out: list[bytes] = []

    async def write(data: bytes) -> None:
        out.append(data)

    while sub.state_write is not None or sub.catchup is not None:
        if sub.state_write is not None:
            await writer._write_state(sub, sub.state_write, write)
        else:
            out.append(await writer._catch_up(sub))
    out.extend(sub.outbox.take_now())
    client.apply(b"".join(out))


async def scenario(
    ops: list[tuple[str, Any]], principal: Principal, filters: Filters, history: int
) -> None:
    upstream = Upstream()
    hub = Hub(history_size=history, outbox_limit=10**6)
    hub.load_state(upstream.snapshot())
    hub.attach(upstream.log_id, 0)
    client = Client(principal, filters)
    writer = StreamWriter(hub, upstream.fetch, None)  # type: ignore[arg-type]

    def connect() -> None:
        if client.sub is None:
            cursor = parse_id(client.last_id) if client.last_id else None
            client.sub = client.stack.enter_context(
                hub.subscribe(principal, filters, cursor, state=True)
            )

    def drop() -> None:
        client.stack.close()
        client.stack, client.sub = ExitStack(), None

    for op, arg in ops:
        if op == "publish":
            start = len(upstream.events) + 1
            batch = [dataclasses.replace(e, sequence=start + i) for i, e in enumerate(arg)]
            upstream.events.extend(batch)
            upstream.every_event.extend(batch)
            hub.publish(upstream.log_id, batch)
        elif op == "connect":
            connect()
        elif op == "drop":
            drop()
        elif op == "restart":  # a new proxy: empty history, the state from the snapshot
            was_connected = client.sub is not None
            drop()
            hub = Hub(history_size=history, outbox_limit=10**6)
            hub.load_state(upstream.snapshot())
            hub.attach(upstream.log_id, len(upstream.events))  # as the bridge does
            writer = StreamWriter(hub, upstream.fetch, None)  # type: ignore[arg-type]
            if was_connected:
                connect()
        else:  # the upstream starts a new log: the bridge loads its snapshot first
            old = hub.position()
            upstream.new_log()
            hub.load_state(upstream.snapshot())
            hub.publish_gap("upstream-restarted", old, None, Cursor(upstream.log_id, 1))
        if client.sub is not None:
            await drain(writer, client)
            reference = reference_map(upstream.events, principal, filters)
            assert client.map == reference
    drop()
    allowed = {_key(rendered(e, filters.payload)) for e in upstream.every_event
               if reference_visible(principal, filters, e)}  # fmt: skip
    assert {_key(item) for item in client.shown} <= allowed


def _key(item: tuple[str, dict[str, Any]]) -> str:
    return json.dumps(item, sort_keys=True)


@settings(max_examples=150, deadline=None)
@given(Ops, principals, stream_filters(), st.integers(0, 6))
def test_state_then_changes_equals_the_whole_log_through_restarts_and_new_logs(
    ops: list[tuple[str, Any]], principal: Principal, filters: Filters, history: int
) -> None:
    trio.run(scenario, [("connect", None), *ops], principal, filters, history)


def test_a_resume_across_a_retained_gap_notice_is_a_resync() -> None:
    # The history holds the gap of a new log after the client's position: replaying it
    # would hand a state-following stream a stream_gap (found by the property above).
    event = Event(0, "session_enqueued", "s1", "", "AK1", "u1", "default", "g1")
    principal = Principal("AK1", Role.USER, "u1", "default")
    ops = [("connect", None), ("drop", None), ("publish", [event]), ("new-log", None),
           ("connect", None)]  # fmt: skip
    trio.run(scenario, ops, principal, Filters(), 2)


def test_a_resume_into_a_log_the_state_replaced_is_a_resync_at_once() -> None:
    # The upstream started a new log; nothing of it was published yet: the client's
    # old position is not resumed (it would be stale until the new log's first event).
    event = Event(0, "session_enqueued", "s1", "", "AK1", "u1", "default", "g1")
    principal = Principal("AK1", Role.USER, "u1", "default")
    ops = [("connect", None), ("publish", [event]), ("drop", None), ("new-log", None),
           ("connect", None)]  # fmt: skip
    trio.run(scenario, ops, principal, Filters(), 0)


def test_an_empty_state_is_begin_then_end() -> None:
    async def main() -> None:
        hub = Hub(history_size=10, outbox_limit=10)
        state = new_state()
        state.reset("L", 0)
        hub.load_state(state)
        principal = Principal("AK1", Role.USER, "u1", "default")
        with hub.subscribe(principal, Filters(), state=True) as sub:
            out: list[bytes] = []

            async def write(data: bytes) -> None:
                out.append(data)

            assert sub.state_write is not None
            await StreamWriter(hub, Upstream().fetch, None)._write_state(  # type: ignore[arg-type]
                sub, sub.state_write, write
            )
        assert b"".join(out) == (
            b'event: stream_state_begin\ndata: {"reason": "initial"}\n\n'
            b'id: L:0\nevent: stream_state_end\ndata: {"entities": 0}\n\n'
        )

    trio.run(main)


def test_state_writes_in_progress_together_encode_each_frame_once() -> None:
    events = [
        dataclasses.replace(e, sequence=i + 1)
        for i, e in enumerate(
            Event(0, "kernel_started", f"s{i}", f"k{i}", "AK1", "u1", "default", "g1")
            for i in range(2500)
        )
    ]

    async def main() -> None:
        hub = Hub(history_size=10, outbox_limit=10)
        state = fold(events, retention=1e9, max_entities=10**6, stamp=lambda e: 0.0)
        state.log_id = "L"
        hub.load_state(state)
        principal = Principal("AK1", Role.USER, "u1", "default")
        writer = StreamWriter(hub, Upstream().fetch, None)  # type: ignore[arg-type]
        bodies: dict[str, list[bytes]] = {}

        async def dashboard(name: str, filters: Filters) -> None:
            out = bodies.setdefault(name, [])

            async def write(data: bytes) -> None:
                out.append(data)

            with hub.subscribe(principal, filters, state=True) as sub:
                assert sub.state_write is not None
                await writer._write_state(sub, sub.state_write, write)

        v5 = Filters(main_only=False, payload=Payload.V5)
        async with trio.open_nursery() as nursery:  # their slices interleave
            for name in ("a", "b", "c"):
                nursery.start_soon(dashboard, name, Filters())
            nursery.start_soon(dashboard, "v5", v5)
        assert b"".join(bodies["a"]) == b"".join(bodies["b"]) == b"".join(bodies["c"])
        assert b"".join(bodies["a"]).count(b"event: kernel_started") == 2500
        assert b'"sessionName":"s7"' in b"".join(bodies["v5"])
        # Once per event and payload, for four writes; nothing is held after them.
        assert writer.state_frames.encoded == 2 * 2500
        assert len(writer.state_frames) == 0

    trio.run(main)
