"""Clients that stop reading: bounded memory, nobody else slowed, connection closed."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest
import trio

from proxy.upstream_server import UpstreamServer

from ..conftest import started_proxy
from ..helpers import EVENTS_PATH, SUPER, USER1, lifecycle, signed_headers, wait_until

BIG_REASON = "x" * 2000  # fills socket buffers quickly


async def stalled_client(url: str) -> tuple[trio.SocketStream, bytes]:
    """A real TCP client that sends a signed request, reads the headers, then stops."""
    parts = urlsplit(url)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((parts.hostname, parts.port))
    stream = trio.SocketStream(sock)
    target = EVENTS_PATH
    headers = signed_headers(f"{url}{target}", SUPER)
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)
    return stream, head


async def drain(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass


async def test_stalled_client_is_dropped_others_get_everything(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with started_proxy(nursery, upstream.target, outbox_limit=50, write_timeout=1.0) as proxy:
        stream, head = await stalled_client(proxy.url)
        assert head.startswith(b"HTTP/1.1 200")
        n = 600
        received: list[str] = []
        async with proxy.stream(USER1) as reader, trio.open_nursery() as readers:

            async def read_all() -> None:
                frames = await reader.take(n, timeout=20)
                received.extend(f.data["sessionId"] for f in frames)

            await wait_until(lambda: proxy.running.hub.clients == 2)
            readers.start_soon(read_all)
            for start in range(0, n, 20):
                upstream.log.append(
                    [
                        lifecycle("kernel_started", f"s{i}", USER1, reason=BIG_REASON)
                        for i in range(start, start + 20)
                    ]
                )
                await trio.sleep(0.01)
        # The reader kept up and got every event, in order...
        assert received == [f"s{i}" for i in range(n)]
        # ...while the stalled one was dropped once its outbox filled, and its
        # connection closed soon after the write timeout.
        await wait_until(lambda: proxy.running.hub.clients == 0, timeout=5)
        await stream.aclose()


async def test_half_open_connection_is_closed_by_the_write_timeout(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    # A huge outbox, so only the write timeout can notice the client is gone.
    async with started_proxy(
        nursery, upstream.target, outbox_limit=1_000_000, write_timeout=0.5
    ) as proxy:
        stream, _ = await stalled_client(proxy.url)
        await wait_until(lambda: proxy.running.hub.clients == 1)
        for start in range(0, 1000, 100):
            upstream.log.append(
                [
                    lifecycle("kernel_started", f"s{i}", USER1, reason=BIG_REASON)
                    for i in range(start, start + 100)
                ]
            )
        await wait_until(lambda: proxy.running.hub.clients == 0, timeout=5)
        # The proxy's kernel aborted the connection: what is buffered ends in a reset.
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError, match="reset"):
            await drain(stream)
        await stream.aclose()


async def test_overflowed_client_resumes_where_it_stopped(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with started_proxy(nursery, upstream.target, outbox_limit=5) as proxy:
        async with proxy.stream(SUPER) as reader:
            await wait_until(lambda: proxy.running.hub.clients == 1)
            # Publish more than the outbox holds while the client is not reading: the
            # hub runs synchronously, so this whole batch lands before any write.
            upstream.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(20)])
            frames = []
            with trio.fail_after(5):
                while True:
                    frame = await reader.next()
                    frames.append(frame)
                    if frame.event == "stream_overflow":
                        break
        received = [f for f in frames if f.id]
        assert frames[-1].data == {"reason": "client-too-slow", "limit": 5}
        last_id = received[-1].id
        assert last_id is not None
        async with proxy.stream(SUPER, headers={"Last-Event-ID": last_id}) as reader:
            rest = await reader.take(20 - len(received))
        got = [f.data["sessionId"] for f in received + rest]
        assert got == [f"s{i}" for i in range(20)]
