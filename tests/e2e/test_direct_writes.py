"""The direct write path (proxy/direct.py) on real sockets, parsed by an HTTP client.

The hub writes an HTTP/1.1 stream's chunks straight to its socket. What a client must
see is exactly what the ASGI path gave it: valid chunked framing (checked by h11 as a
client), the same SSE bytes in the same order, nothing lost when the socket fills and
the rest goes through the client's task, and a clean end of body from h11 afterwards.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import h11
import trio

from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest, started_proxy
from ..helpers import (
    EVENTS_PATH,
    SUPER,
    USER1,
    Frame,
    lifecycle,
    parse_block,
    signed_headers,
    wait_until,
)

BIG_REASON = "y" * 3000


class RawClient:
    """One HTTP connection, request written by hand, response parsed by h11."""

    def __init__(self, stream: trio.SocketStream, http_version: str) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.http_version = http_version
        self.response: h11.Response | None = None
        self.body = b""
        self.ended = False

    @classmethod
    async def open(
        cls, url: str, *, http_version: str = "1.1", method: str = "GET", rcvbuf: int = 0
    ) -> RawClient:
        parts = urlsplit(url)
        sock = trio.socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((parts.hostname, parts.port))
        client = cls(trio.SocketStream(sock), http_version)
        headers = signed_headers(f"{url}{EVENTS_PATH}", SUPER, method=method)
        lines = [f"{method} {EVENTS_PATH} HTTP/{http_version}", f"Host: {parts.netloc}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        # h11 must know the request to parse the response; it only speaks 1.1 itself,
        # so the 1.0 request line goes out as written and h11 learns it by parsing.
        client.conn.send(
            h11.Request(method=method, target=EVENTS_PATH, headers=[("Host", parts.netloc)])
        )
        client.conn.send(h11.EndOfMessage())
        await client.stream.send_all(request)
        return client

    async def pump(self) -> bool:
        """Read once; False at end of body or connection."""
        data = await self.stream.receive_some(65536)
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                return bool(data)
            if isinstance(event, h11.Response):
                self.response = event
            elif isinstance(event, h11.Data):
                self.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self.ended = True
                return False

    async def read_events(self, n: int, timeout: float = 10) -> list[Frame]:
        """Read until ``n`` complete events (and whatever else) have arrived."""
        with trio.fail_after(timeout):
            while len(self.frames()) < n and await self.pump():
                pass
        return self.frames()

    def frames(self) -> list[Frame]:
        """The complete blocks received so far, comments left out."""
        blocks = self.body.split(b"\n\n")[:-1]  # the last piece is incomplete (or empty)
        return [parse_block(b) for b in blocks if not b.startswith(b":")]


def header(response: h11.Response | None, name: bytes) -> bytes | None:
    assert response is not None
    return dict(response.headers).get(name)


async def test_http11_stream_is_written_directly_in_valid_chunks(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    hub = proxy.running.hub
    client = await RawClient.open(proxy.url)
    await wait_until(lambda: hub.clients == 1 and hub.direct_streams == 1)
    log_id = upstream.log.log_id
    upstream.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(50)])
    await client.read_events(50)
    assert header(client.response, b"transfer-encoding") == b"chunked"
    frames = client.frames()
    assert [f.id for f in frames] == [f"{log_id}:{i}" for i in range(1, 51)]
    assert (
        frames[0].raw
        == (
            f"id: {log_id}:1\nevent: kernel_started\n"
            'data: {"sessionId":"s0","ownerAccessKey":"AKUSER1","reason":null}\n\n'
        ).encode()
    )
    # Shutdown: server_close goes out, then h11's own last chunk ends the body cleanly.
    proxy.running.shutdown()
    with trio.fail_after(10):
        while await client.pump():
            pass
    assert client.ended
    assert client.frames()[-1].event == "server_close"
    await client.stream.aclose()


async def test_full_socket_hands_over_to_the_task_without_losing_a_byte(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with started_proxy(nursery, upstream.target, outbox_limit=100_000) as proxy:
        hub = proxy.running.hub
        client = await RawClient.open(proxy.url, rcvbuf=4096)
        await wait_until(lambda: hub.direct_streams == 1)
        n = 600  # ~2 MB: far beyond both socket buffers, so writes stall and resume
        for start in range(0, n, 50):
            upstream.log.append(
                [
                    lifecycle("kernel_started", f"s{i}", USER1, reason=BIG_REASON)
                    for i in range(start, start + 50)
                ]
            )
            await trio.sleep(0.005)
        await trio.sleep(0.3)  # not reading: the proxy's writes back up meanwhile
        await client.read_events(n, timeout=30)
        frames = client.frames()
        assert [f.data["sessionId"] for f in frames] == [f"s{i}" for i in range(n)]
        assert all(f.data["reason"] == BIG_REASON for f in frames)
        assert hub.direct_stalls > 0  # the socket did fill: the hand-over was exercised
        await client.stream.aclose()


async def test_http10_and_head_take_the_asgi_path(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    hub = proxy.running.hub
    head = await RawClient.open(proxy.url, method="HEAD")
    with trio.fail_after(10):
        while await head.pump():
            pass
    assert head.response is not None
    assert head.response.status_code == 200
    assert head.body == b""
    await head.stream.aclose()
    assert hub.clients == 0  # a HEAD never subscribed

    old = await RawClient.open(proxy.url, http_version="1.0")
    await wait_until(lambda: hub.clients == 1)
    upstream.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(5)])
    await old.read_events(5)
    assert header(old.response, b"transfer-encoding") is None  # close-delimited
    assert [f.data["sessionId"] for f in old.frames()] == [f"s{i}" for i in range(5)]
    assert hub.direct_streams == 0
    await old.stream.aclose()


async def test_client_gone_mid_stream_releases_it(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    hub = proxy.running.hub
    clients = [await RawClient.open(proxy.url) for _ in range(3)]
    await wait_until(lambda: hub.direct_streams == 3 and hub.clients == 3)
    for client in clients[:2]:
        await client.stream.aclose()
    # Writes to the departed ones fail (or their disconnect is seen): either way they
    # are gone, and the one still reading gets everything.
    upstream.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(20)])
    await clients[2].read_events(20)
    await wait_until(lambda: hub.clients == 1)
    assert len(clients[2].frames()) == 20
    await clients[2].stream.aclose()


async def test_clients_leaving_together_end_in_turn_and_nothing_reaches_the_departed(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    """99 clients close at once (a load balancer dropping a replica's clients): their
    endings go through the pacer (some had to wait their turn), every one of them is
    released, and the client that stays gets every event published meanwhile."""
    hub, endings = proxy.running.hub, proxy.running.endings
    assert endings is not None
    staying = await RawClient.open(proxy.url)
    # 100 streams: the key's limit (limits.max_streams_per_key); 64 end per batch.
    leaving = [await RawClient.open(proxy.url) for _ in range(99)]
    await wait_until(lambda: hub.clients == 100, timeout=30)
    before = endings.waited
    for client in leaving:
        client.stream.socket.close()  # all in one scheduler step: they arrive together
    upstream.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(20)])
    await staying.read_events(20)
    await wait_until(lambda: hub.clients == 1, timeout=30)
    assert endings.waited - before > 0
    assert endings.waiting == 0
    assert [f.data["sessionId"] for f in staying.frames()] == [f"s{i}" for i in range(20)]
    await staying.stream.aclose()


async def test_a_client_that_half_closes_ends_its_stream_without_the_last_chunk(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    """HTTP/1.1 gives a client no way to end one response but to end the connection: a
    client shutting down its sending side has left. Its stream ends (as a closed one
    does), and the proxy closes the connection without writing more to it."""
    hub = proxy.running.hub
    client = await RawClient.open(proxy.url)
    await wait_until(lambda: hub.clients == 1)
    upstream.log.append([lifecycle("kernel_started", f"s{i}", USER1) for i in range(3)])
    await client.read_events(3)
    await client.stream.send_eof()
    await wait_until(lambda: hub.clients == 0)
    with trio.fail_after(10):
        rest = b""
        while data := await client.stream.receive_some(65536):
            rest += data
    assert rest == b""  # no "0\r\n\r\n": the connection just closes
    await client.stream.aclose()
