"""Direct writes (direct.py, Outbox/Hub direct mode) over a real socket pair.

The hub writes a direct client's frames itself, once per round, as HTTP/1.1 chunks;
the client's task owns the socket only while ``busy``. What must hold: the peer reads
exactly the chunked frames, in order; nothing is written while the task owns the
socket or hypercorn's lock is held; what a full socket does not take is handed to the
task, byte-exact; a vanished peer closes the outbox.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from proxy.direct import ChunkSink, chunk
from proxy.events import Event
from proxy.hub import Hub, encode
from proxy.policy import Filters, Principal, Role

SUPER = Principal("AKS", Role.SUPERADMIN, "s", "default")


def ev(seq: int, reason: str = "") -> Event:
    return Event(seq, "kernel_started", f"s{seq}", "", "AK1", "u1", "default", "g1", reason)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def make_sink(sock: socket.socket, lock: trio.Lock | None = None) -> ChunkSink:
    trio_sock = trio.socket.from_stdlib_socket(sock)
    return ChunkSink(trio.SocketStream(trio_sock), sock, lock or trio.Lock())


def read_all(sock: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(BlockingIOError):
        while data := sock.recv(1 << 20):
            out += data
    return out


def test_chunk_framing() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 300) == b"12c\r\n" + b"x" * 300 + b"\r\n"


async def test_hub_writes_idle_direct_clients_once_per_round(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    hub = Hub(history_size=0, outbox_limit=100)
    with hub.subscribe(SUPER, Filters()) as sub:
        hub.attach_sink(sub, make_sink(ours))
        # Busy (the task has not parked yet): frames wait for the task.
        hub.publish("L", [ev(1)])
        assert read_all(peer) == b""
        assert len(sub.outbox) == 1
        sub.outbox.take_now()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sub.outbox.idle)
            await trio.testing.wait_all_tasks_blocked()
            # Idle: one round of three events is one chunk, written by publish itself.
            with hub.batch():
                hub.publish("L", [ev(2)])
                hub.publish("L", [ev(3), ev(4)])
                assert read_all(peer) == b""  # not before the round ends
            body = read_all(peer)
            frames = b"".join(encode("L", e) for e in (ev(2), ev(3), ev(4)))
            assert body == chunk(frames)
            assert sub.outbox.sent == 4  # one taken by the task, three by the hub
            assert not sub.outbox.busy  # the task was never woken
            sub.outbox.hand_over()  # ...until handed the socket back
        assert sub.outbox.busy


async def test_one_round_frames_each_client_its_own_frames() -> None:
    """Clients of one round that got one and the same frame share its chunk; a client
    that got several gets them joined in one chunk. Each peer reads exactly its own."""
    hub = Hub(history_size=0, outbox_limit=100)
    pairs = [socket.socketpair() for _ in range(3)]
    for a, b in pairs:
        a.setblocking(False)
        b.setblocking(False)
    everything = Filters()
    only_s2 = Filters(session="s2")
    try:
        with contextlib.ExitStack() as stack:
            subs = [
                stack.enter_context(hub.subscribe(SUPER, f)) for f in (everything, only_s2, only_s2)
            ]
            async with trio.open_nursery() as nursery:
                for sub, (ours, _) in zip(subs, pairs, strict=True):
                    hub.attach_sink(sub, make_sink(ours))
                    nursery.start_soon(sub.outbox.idle)
                await trio.testing.wait_all_tasks_blocked()
                with hub.batch():
                    hub.publish("L", [ev(1), ev(2)])
                bodies = [read_all(peer) for _, peer in pairs]
                for sub in subs:
                    sub.outbox.hand_over()
        assert bodies[0] == chunk(encode("L", ev(1)) + encode("L", ev(2)))
        assert bodies[1] == bodies[2] == chunk(encode("L", ev(2)))
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_full_socket_hands_the_rest_to_the_task_byte_exact(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    hub = Hub(history_size=0, outbox_limit=10_000)
    with hub.subscribe(SUPER, Filters()) as sub:
        sink = make_sink(ours)
        hub.attach_sink(sub, sink)
        outbox = sub.outbox
        events = [ev(i, reason="r" * 500) for i in range(1, 401)]  # ~250 KB
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.idle)
            await trio.testing.wait_all_tasks_blocked()
            hub.publish("L", events)
            assert outbox.busy  # the socket filled: the task owns it now
            assert outbox.stalled
            assert hub.direct_stalls == 1
            # More events while the task owns the socket stay queued for it.
            hub.publish("L", [ev(401)])
            assert len(outbox) == 1

            received = b""

            async def reader() -> None:
                nonlocal received
                peer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(peer))
                while data := await peer_stream.receive_some(1 << 16):
                    received += data

            nursery.start_soon(reader)
            # What the task does (stream.py): the stalled rest, then the queue.
            stalled, outbox.stalled = outbox.stalled, b""
            await sink.write(stalled)
            await sink.write(chunk(b"".join(outbox.take_now())))
            ours.shutdown(socket.SHUT_WR)
        expected = chunk(b"".join(encode("L", e) for e in events))
        expected += chunk(encode("L", ev(401)))
        assert received == expected


async def test_no_write_while_the_connection_lock_is_held(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    lock = trio.Lock()
    hub = Hub(history_size=0, outbox_limit=100)
    with hub.subscribe(SUPER, Filters()) as sub:
        hub.attach_sink(sub, make_sink(ours, lock))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sub.outbox.idle)
            await trio.testing.wait_all_tasks_blocked()
            async with lock:  # hypercorn is writing on this connection
                hub.publish("L", [ev(1)])
            assert read_all(peer) == b""
            assert sub.outbox.busy
            assert sub.outbox.stalled == chunk(encode("L", ev(1)))


async def test_a_vanished_peer_closes_the_outbox(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    hub = Hub(history_size=0, outbox_limit=100)
    with hub.subscribe(SUPER, Filters()) as sub:
        hub.attach_sink(sub, make_sink(ours))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sub.outbox.idle)
            await trio.testing.wait_all_tasks_blocked()
            peer.close()
            hub.publish("L", [ev(1)])
        assert sub.outbox.closed
        assert sub.outbox.reason == "client-gone"


def test_a_gone_sink_drops_writes_without_touching_the_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Between a client closing and its stream's end (which may wait its turn), the
    hub's writes to it are dropped: reported written, never sent, never handed over."""
    a, b = pair
    sink = make_sink(a)
    assert sink.try_write(chunk(b"before")) == b""
    sink.gone = True
    assert sink.try_write(chunk(b"after")) == b""
    assert read_all(b) == chunk(b"before")
