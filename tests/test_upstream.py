"""The upstream bridge and the shipped upstream server, over real gRPC on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy._pb.kernel_events.v1 import events_pb2_grpc as pb_grpc
from proxy.config import UpstreamSettings
from proxy.events import MAX_EVENT_BYTES
from proxy.hub import Hub
from proxy.policy import Filters, Principal, Role
from proxy.state import State
from proxy.upstream import (
    Fetched,
    Gap,
    Sequencer,
    UpstreamBridge,
    _fetched,
    decode_response,
)
from proxy.upstream_server import EventLog, UpstreamServer

from .helpers import USER1, USER2, lifecycle, wait_until

SUPER = Principal("AKS", Role.SUPERADMIN, "s", "default")


def bridge_for(target: str, hub: Hub) -> UpstreamBridge:
    return UpstreamBridge(
        UpstreamSettings(target=target, reconnect_min=0.05, reconnect_max=0.3), hub
    )


def events_in(frames: list[bytes]) -> list[tuple[str, str | None]]:
    """(event name, id) for each frame."""
    out = []
    for frame in frames:
        fields = dict(
            line.split(": ", 1) for line in frame.decode().strip().split("\n") if ": " in line
        )
        out.append((fields["event"], fields.get("id")))
    return out


# -- Sequencer (pure) ------------------------------------------------------------


def test_sequencer_drops_duplicates_and_names_gaps() -> None:
    seq = Sequencer()
    assert seq.accept("L", [5, 6]) == (0, [])
    assert seq.accept("L", [5, 6, 7]) == (2, [])
    assert seq.accept("L", [10]) == (0, [(0, Gap("upstream-gap", "L:7", "L:10"))])
    assert seq.accept("M", [1, 2]) == (0, [(0, Gap("upstream-restarted", "L:10", "M:1"))])
    assert (seq.log_id, seq.last) == ("M", 2)


def test_sequencer_finds_gaps_inside_a_batch() -> None:
    seq = Sequencer()
    seq.attach("L", 0)
    assert seq.accept("L", [1, 2, 4, 5, 9]) == (
        0,
        [(2, Gap("upstream-gap", "L:2", "L:4")), (4, Gap("upstream-gap", "L:5", "L:9"))],
    )


def test_sequencer_log_change_without_events_is_a_gap() -> None:
    seq = Sequencer()
    seq.accept("L", [1])
    _, gaps = seq.accept("M", [])
    assert gaps == [(0, Gap("upstream-restarted", "L:1", None))]


# -- the shipped server ------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[UpstreamServer]:
    srv = UpstreamServer(EventLog(capacity=5), "127.0.0.1:0")
    srv.start()
    yield srv
    srv.stop(0)


def subscribe(target: str, after: int = 0, log_id: str = "") -> tuple[grpc.Channel, grpc.Call]:
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.KernelEventsServiceStub(channel)
    call = stub.Subscribe(pb.SubscribeRequest(after_sequence=after, log_id=log_id), timeout=5)
    return channel, call


def test_server_first_response_names_the_log(server: UpstreamServer) -> None:
    server.log.append([lifecycle("kernel_started", "a", USER1)])
    channel, call = subscribe(server.target)
    first = next(call)  # type: ignore[call-overload]
    assert (first.log_id, list(first.events), first.head_sequence) == (server.log.log_id, [], 1)
    call.cancel()  # type: ignore[no-untyped-call]
    channel.close()


def test_server_resumes_after_sequence_in_batches(server: UpstreamServer) -> None:
    server.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(4)])
    channel, call = subscribe(server.target, after=1, log_id=server.log.log_id)
    next(call)  # type: ignore[call-overload]
    batch = next(call)  # type: ignore[call-overload]
    assert [e.sequence for e in batch.events] == [2, 3, 4]
    call.cancel()  # type: ignore[no-untyped-call]
    channel.close()


def test_server_history_is_bounded(server: UpstreamServer) -> None:
    server.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(8)])
    channel, call = subscribe(server.target, after=1, log_id=server.log.log_id)
    hello = next(call)  # type: ignore[call-overload]
    assert hello.oldest_sequence == 4
    batch = next(call)  # type: ignore[call-overload]
    assert [e.sequence for e in batch.events] == [4, 5, 6, 7, 8]
    call.cancel()  # type: ignore[no-untyped-call]
    channel.close()


def test_server_cursor_from_another_log_gets_everything_retained(server: UpstreamServer) -> None:
    server.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(3)])
    channel, call = subscribe(server.target, after=99, log_id="an-older-log")
    next(call)  # type: ignore[call-overload]
    assert [e.sequence for e in next(call).events] == [1, 2, 3]  # type: ignore[call-overload]
    call.cancel()  # type: ignore[no-untyped-call]
    channel.close()


def test_log_rejects_non_increasing_sequence() -> None:
    log = EventLog()
    log.append([lifecycle("a", "s", USER1, sequence=5)])
    with pytest.raises(ValueError, match="not after 5"):
        log.append([lifecycle("a", "s", USER1, sequence=5)])


# -- the bridge --------------------------------------------------------------------


async def test_bridge_delivers_and_cancellation_reaches_the_thread(
    server: UpstreamServer,
) -> None:
    hub = Hub(history_size=100, outbox_limit=100)
    bridge = bridge_for(server.target, hub)
    with hub.subscribe(SUPER, Filters()) as sub:
        # The worker thread must finish for the nursery to close (abandon_on_cancel is
        # off), so a prompt exit proves cancellation reached the blocked `next(call)`.
        with trio.fail_after(3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge.run)
                await wait_until(lambda: bridge.live)
                assert server.active_subscribers == 1
                server.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(3)])
                await wait_until(lambda: len(sub.outbox) == 3)
                nursery.cancel_scope.cancel()
        log_id = server.log.log_id
        assert events_in(await sub.outbox.take()) == [
            ("kernel_started", f"{log_id}:{i}") for i in (1, 2, 3)
        ]
    # ...and the upstream saw the RPC end.
    await wait_until(lambda: server.active_subscribers == 0)


async def test_bridge_waits_for_an_unreachable_upstream_then_streams() -> None:
    event_log = EventLog()
    with socket.socket() as probe:  # a port that is free: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub = Hub(history_size=100, outbox_limit=100)
    bridge = bridge_for(f"127.0.0.1:{port}", hub)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bridge.run)
        await wait_until(lambda: bridge.connects >= 3)
        assert not bridge.live
        server = UpstreamServer(event_log, f"127.0.0.1:{port}")
        server.start()
        try:
            await wait_until(lambda: bridge.live)
            event_log.append([lifecycle("kernel_started", "a", USER1)])
            await wait_until(lambda: hub.published == 1)
        finally:
            nursery.cancel_scope.cancel()
            server.stop(0)


async def test_bridge_resumes_without_loss_or_duplicate_after_upstream_restart() -> None:
    event_log = EventLog()
    server = UpstreamServer(event_log, "127.0.0.1:0")
    port = server.port
    server.start()
    hub = Hub(history_size=1000, outbox_limit=1000)
    bridge = bridge_for(server.target, hub)
    with hub.subscribe(SUPER, Filters()) as sub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.run)
            await wait_until(lambda: bridge.live)
            sent = 0
            for _round in range(5):
                event_log.append(
                    [lifecycle("kernel_started", f"s{sent + i}", USER1) for i in range(10)]
                )
                sent += 10
                await wait_until(lambda n=sent: hub.published == n)  # type: ignore[misc]
                server.stop(0)
                # Events the proxy has not seen yet, written while it is cut off.
                event_log.append(
                    [lifecycle("kernel_started", f"s{sent + i}", USER1) for i in range(5)]
                )
                sent += 5
                server = UpstreamServer(event_log, f"127.0.0.1:{port}")
                server.start()
                await wait_until(lambda n=sent: hub.published == n)  # type: ignore[misc]
            nursery.cancel_scope.cancel()
        server.stop(0)
        got = events_in(await sub.outbox.take())
    assert [i for _, i in got] == [f"{event_log.log_id}:{n}" for n in range(1, sent + 1)]
    assert bridge.connects >= 6


async def test_bridge_reports_a_gap_when_the_upstream_restarts_empty() -> None:
    server = UpstreamServer(EventLog(), "127.0.0.1:0")
    port = server.port
    server.start()
    hub = Hub(history_size=100, outbox_limit=100)
    bridge = bridge_for(server.target, hub)
    with hub.subscribe(SUPER, Filters()) as sub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.run)
            await wait_until(lambda: bridge.live)
            server.log.append([lifecycle("kernel_started", "a", USER1)])
            await wait_until(lambda: hub.published == 1)
            old_log = server.log.log_id
            server.stop(0)
            server = UpstreamServer(EventLog(), f"127.0.0.1:{port}")  # a new, empty log
            server.start()
            await wait_until(lambda: bridge.sequencer.log_id == server.log.log_id)
            server.log.append([lifecycle("kernel_started", "b", USER1)])
            await wait_until(lambda: hub.published == 2)
            nursery.cancel_scope.cancel()
        server.stop(0)
        got = events_in(await sub.outbox.take())
    assert got == [
        ("kernel_started", f"{old_log}:1"),
        ("stream_gap", None),
        ("kernel_started", f"{server.log.log_id}:1"),
    ]


async def test_bridge_skips_malformed_events_and_keeps_streaming(server: UpstreamServer) -> None:
    hub = Hub(history_size=100, outbox_limit=100)
    bridge = bridge_for(server.target, hub)
    with hub.subscribe(SUPER, Filters()) as sub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.run)
            await wait_until(lambda: bridge.live)
            server.log.append(
                [
                    lifecycle("bad\nname", "a", USER1),
                    lifecycle("kernel_started", "b", USER1),
                ]
            )
            await wait_until(lambda: hub.published == 1)
            nursery.cancel_scope.cancel()
        assert bridge.malformed == 1
        # Skipped, and said so: clients learn that an event is missing.
        assert events_in(await sub.outbox.take()) == [
            ("stream_gap", None),
            ("kernel_started", f"{server.log.log_id}:2"),
        ]


async def test_bridge_gives_up_on_a_peer_that_never_answers() -> None:
    with socket.socket() as silent:  # accepts TCP connections, never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        hub = Hub(history_size=10, outbox_limit=10)
        bridge = UpstreamBridge(
            UpstreamSettings(
                target=f"127.0.0.1:{silent.getsockname()[1]}",
                connect_timeout=0.2,
                reconnect_min=0.05,
                reconnect_max=0.1,
            ),
            hub,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.run)
            await wait_until(lambda: bridge.connects >= 3)
            assert not bridge.live
            nursery.cancel_scope.cancel()


def test_sequencer_live_start_at_head_then_gap_is_reported() -> None:
    seq = Sequencer()
    seq.attach("L", 10)
    seq.attach("L", 99)  # only the first attachment sets the position
    assert seq.accept("L", [11]) == (0, [])
    assert seq.accept("L", [15]) == (0, [(0, Gap("upstream-gap", "L:11", "L:15"))])


def _response(log_id: str, seqs: list[int], head: int) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(
        log_id=log_id,
        head_sequence=head,
        events=[lifecycle("kernel_started", f"s{n}", USER1, sequence=n) for n in seqs],
    )


LOST = Gap("upstream-unavailable", "L:4", "L:10")


def test_fetched_keeps_only_the_requested_range() -> None:
    got = _fetched(
        "L", 4, 9, [_response("L", [], 20), _response("L", [3, 4, 5, 6, 7, 8, 9, 10], 20)], LOST
    )
    assert [e.sequence for e in got.events] == [5, 6, 7, 8, 9]
    assert (got.reached, got.gap) == (9, None)


def test_fetched_names_what_the_upstream_no_longer_has() -> None:
    got = _fetched("L", 4, 9, [_response("L", [], 20), _response("L", [7, 8, 9], 20)], LOST)
    assert got.gap == Gap("history-exhausted", "L:4", "L:7")
    assert [e.sequence for e in got.events] == [7, 8, 9]


def test_fetched_from_a_restarted_upstream_is_a_gap() -> None:
    got = _fetched("L", 4, 9, [_response("M", [1, 2], 2)], LOST)
    assert got.events == []
    assert got.gap == Gap("upstream-restarted", "L:4", "L:10")
    assert got.reached == 9


def test_fetched_nothing_at_all_is_a_gap() -> None:
    assert _fetched("L", 4, 9, [], LOST) == Fetched([], 9, LOST)


def test_fetched_partial_chunk_advances_the_cursor() -> None:
    got = _fetched("L", 4, 9, [_response("L", [], 20), _response("L", [5, 6], 20)], LOST)
    assert (got.reached, got.gap) == (6, None)


def _with_bad_utf8(event: pb.LifecycleEvent) -> bytes:
    raw = bytearray(event.SerializeToString())
    raw[raw.index(b"BAD")] = 0xFF  # a string that is not UTF-8
    return bytes(raw)


def _batch(log_id: str, head: int, *events: bytes) -> bytes:
    out = pb.SubscribeResponse(log_id=log_id, head_sequence=head).SerializeToString()
    for event in events:
        out += b"\x12" + _varint(len(event)) + event
    return out


def test_apply_refuses_oversized_events_however_the_batch_is_measured() -> None:
    """Only a response over MAX_EVENT_BYTES can hold an event over it: then each of its
    events is measured (unknown fields count too), and only those over it are refused."""
    hub = Hub(history_size=2000, outbox_limit=2000)
    bridge = bridge_for("127.0.0.1:1", hub)
    with hub.subscribe(SUPER, Filters()) as sub:
        bridge._apply(pb.SubscribeResponse(log_id="L", head_sequence=0))
        small = [lifecycle("kernel_started", f"s{i}", USER1, sequence=i) for i in (1, 2)]
        bridge._apply(pb.SubscribeResponse(log_id="L", events=small))
        big = lifecycle("kernel_started", "big", USER1, sequence=3, reason="x" * MAX_EVENT_BYTES)
        # Over the limit only through a field this build does not know.
        unknown = pb.LifecycleEvent.FromString(
            lifecycle("kernel_started", "u", USER1, sequence=4).SerializeToString()
            + b"\x9a\x06"  # field 99, length-delimited
            + _varint(MAX_EVENT_BYTES)
            + b"u" * MAX_EVENT_BYTES
        )
        fine = lifecycle("kernel_started", "s5", USER1, sequence=5)
        bridge._apply(pb.SubscribeResponse(log_id="L", events=[big, unknown, fine]))
        # A small first event does not vouch for the rest of its batch.
        small_first = lifecycle("kernel_started", "s6", USER1, sequence=6)
        big.sequence = 7
        bridge._apply(pb.SubscribeResponse(log_id="L", events=[small_first, big]))
        # Over the limit as a whole, every event well within it: all of them pass.
        many = [
            lifecycle("kernel_started", "s" * 100, USER1, sequence=i, reason="r" * 200)
            for i in range(8, 408)
        ]
        batch = pb.SubscribeResponse(log_id="L", events=many)
        assert batch.ByteSize() > MAX_EVENT_BYTES
        bridge._apply(batch)
        assert bridge.malformed == 3
        assert hub.published == 404
        assert events_in(sub.outbox._frames[:6]) == [
            ("kernel_started", "L:1"),
            ("kernel_started", "L:2"),
            ("stream_gap", None),
            ("kernel_started", "L:5"),
            ("kernel_started", "L:6"),
            ("stream_gap", None),
        ]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_decode_response_salvages_the_good_events_of_a_batch() -> None:
    good = lifecycle("kernel_started", "a", USER1, sequence=1).SerializeToString()
    bad = _with_bad_utf8(lifecycle("kernel_started", "BAD", USER1, sequence=2))
    later = lifecycle("kernel_started", "c", USER1, sequence=3).SerializeToString()
    response, skipped = decode_response(_batch("L", 3, good, bad, later))
    assert skipped == 1
    assert (response.log_id, response.head_sequence) == ("L", 3)
    assert [e.sequence for e in response.events] == [1, 3]


def test_decode_response_of_a_clean_batch_is_the_plain_decode() -> None:
    clean = pb.SubscribeResponse(log_id="L", events=[lifecycle("x", "s", USER1, sequence=1)])
    assert decode_response(clean.SerializeToString()) == (clean, 0)


async def test_an_undecodable_event_does_not_kill_the_stream() -> None:
    """A raw gRPC upstream sends one batch with a bad string, then keeps going."""
    good = lifecycle("kernel_started", "a", USER1, sequence=1).SerializeToString()
    bad = _with_bad_utf8(lifecycle("kernel_started", "BAD", USER1, sequence=2))
    later = lifecycle("kernel_started", "c", USER1, sequence=3).SerializeToString()
    batches = [_batch("L", 0), _batch("L", 3, good, bad, later)]

    def subscribe(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from batches
        while context.is_active():
            threading.Event().wait(0.05)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "kernel_events.v1.KernelEventsService",
        {"Subscribe": grpc.unary_stream_rpc_method_handler(subscribe)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        hub = Hub(history_size=10, outbox_limit=10)
        bridge = bridge_for(f"127.0.0.1:{port}", hub)
        with hub.subscribe(SUPER, Filters()) as sub:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge.run)
                await wait_until(lambda: hub.published == 2)
                nursery.cancel_scope.cancel()
            got = events_in(await sub.outbox.take())
        assert bridge.malformed == 1
        assert bridge.connects == 1  # no reconnect loop on a poison batch
        # The missing event is announced, not skipped in silence.
        assert got == [("kernel_started", "L:1"), ("stream_gap", None), ("kernel_started", "L:3")]
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    "sequences",
    [list(range(1, 21)), [1, 2, 5, 6, 7, 10, 11, 30], [100, 101, 102]],
)
def test_read_after_finds_the_position_with_and_without_gaps(sequences: list[int]) -> None:
    log = EventLog(capacity=100)
    log.append([lifecycle("kernel_started", "s", USER1, sequence=n) for n in sequences])
    for after in range(0, sequences[-1] + 2):
        events, _, _ = log.read_after(after, 1000, 0)
        assert [e.sequence for e in events] == [n for n in sequences if n > after]


@given(
    capacity=st.integers(min_value=0, max_value=40),
    batches=st.lists(st.lists(st.integers(min_value=1, max_value=3), max_size=30), max_size=12),
    afters=st.lists(st.integers(min_value=-1, max_value=400), min_size=1, max_size=8),
    limit=st.integers(min_value=1, max_value=50),
)
def test_the_log_keeps_exactly_the_newest_capacity_events(
    capacity: int, batches: list[list[int]], afters: list[int], limit: int
) -> None:
    """Whatever is appended, in whatever batches (steps > 1 are gaps), the log answers
    as a list of the newest ``capacity`` events would: oldest, and every read. The
    capacity is small, so the physical cut of the forgotten prefix happens often."""
    log = EventLog(capacity=capacity)
    appended: list[int] = []
    for batch in batches:
        seqs: list[int] = []
        for step in batch:
            seqs.append((seqs[-1] if seqs else appended[-1] if appended else 0) + step)
        log.append([lifecycle("kernel_started", "s", USER1, sequence=n) for n in seqs])
        appended += seqs
        kept = appended[max(0, len(appended) - capacity) :] if capacity else []
        assert log.oldest() == (kept[0] if kept else log.head + 1)
        for after in afters:
            events, oldest, head = log.read_after(after, limit, 0)
            assert [e.sequence for e in events] == [n for n in kept if n > after][:limit]
            assert (oldest, head) == (log.oldest(), appended[-1] if appended else 0)


def test_forget_drops_what_is_retained_and_sequences_go_on() -> None:
    log = EventLog(capacity=10)
    log.append([lifecycle("kernel_started", "s", USER1) for _ in range(15)])
    assert log.forget() == 10
    assert log.oldest() == 16
    assert log.read_after(0, 100, 0)[0] == []
    log.append([lifecycle("kernel_started", "s", USER1)])
    assert [e.sequence for e in log.read_after(0, 100, 0)[0]] == [16]


def _snapshot(target: str) -> list[pb.SnapshotResponse]:
    channel = grpc.insecure_channel(target)
    try:
        stub = pb_grpc.KernelEventsServiceStub(channel)
        return list(stub.Snapshot(pb.SnapshotRequest(), timeout=10))
    finally:
        channel.close()


def test_snapshot_serves_the_state_at_the_head_even_after_the_log_is_trimmed() -> None:
    log = EventLog(capacity=3)
    server = UpstreamServer(log, "127.0.0.1:0")
    server.start()
    try:
        log.append(
            [
                lifecycle("session_started", "a", USER1),
                lifecycle("session_started", "b", USER2),
                lifecycle("kernel_started", "a", USER1, kernel_id="k1"),
                lifecycle("session_terminating", "a", USER1),
                lifecycle("session_started", "c", USER1),
            ]
        )
        log.forget()
        chunks = _snapshot(server.target)
        assert [c.last for c in chunks] == [True]
        assert {(c.log_id, c.sequence) for c in chunks} == {(log.log_id, 5)}
        held = [(e.sequence, e.session_id, e.name) for c in chunks for e in c.events]
        # Latest per session slot, in log order, each event once.
        assert held == [(2, "b", "session_started"), (3, "a", "kernel_started"),
                        (4, "a", "session_terminating"), (5, "c", "session_started")]  # fmt: skip
    finally:
        server.stop(0)


def test_a_big_snapshot_comes_in_chunks_that_name_one_position() -> None:
    log = EventLog()
    log.append(lifecycle("session_started", f"s{i}", USER1, reason="x" * 500) for i in range(5000))
    server = UpstreamServer(log, "127.0.0.1:0")
    server.start()
    try:
        chunks = _snapshot(server.target)
        assert len(chunks) > 1
        assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert {c.sequence for c in chunks} == {5000}
        assert sum(len(c.events) for c in chunks) == 5000
    finally:
        server.stop(0)


NAMES_FOR_LOG = ["session_started", "kernel_started", "session_terminated", "x_new"]


@given(
    capacity=st.integers(1, 6),
    steps=st.lists(
        st.one_of(
            st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(NAMES_FOR_LOG)),
                     min_size=1, max_size=8),
            st.just("snapshot"),
            st.just("forget"),
        ),
        max_size=12,
    ),
)  # fmt: skip
def test_the_lazy_fold_folds_every_event_once_in_order_however_the_log_is_cut(
    capacity: int, steps: list[list[tuple[str, str]] | str]
) -> None:
    # The log folds its state when a snapshot is read and before events are cut or
    # forgotten, not as it appends: the snapshot must still equal a fold of every
    # event ever appended (a reference State fed them one by one).
    log = EventLog(capacity=capacity)
    reference: State[pb.LifecycleEvent] = State(
        retention=3600.0, max_entities=1_000_000, stamp=lambda e: 0.0
    )
    reference.reset(log.log_id, 0)
    for step in steps:
        if step == "snapshot":
            head, events = log.snapshot()
            assert head == log.head
            assert [e.sequence for e in events] == [e.sequence for e in reference.snapshot()]
        elif step == "forget":
            log.forget()
        elif isinstance(step, list):
            batch = [lifecycle(name, session, USER1) for session, name in step]
            log.append(batch)
            for event in batch:
                reference.apply(event)
    _, events = log.snapshot()
    assert [e.sequence for e in events] == [e.sequence for e in reference.snapshot()]
