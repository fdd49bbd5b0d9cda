"""System 6: the send floor, the least any server can do per delivery on this machine.

    python -m bench.peers.send_floor --port P --upstream HOST:PORT

An asyncio (uvloop) protocol server that answers every request with an SSE response
head and, for each upstream event, writes the same chunk-framed frame (this proxy's
bytes: ``proxy.hub.encode``) to every open connection: one ``transport.write`` each,
which uvloop turns into one ``send`` at once. No authentication, no filtering, no
queue, no per-client state, no heartbeats: what is left is the upstream hop, the
loopback TCP stack's cost per delivery and the load generator's. Its fan-out latency
is the floor the harness can measure for any server; only the ``fanout`` scenario
runs it. ``GET /readyz`` answers 200 once the upstream stream delivered a response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final, cast

from proxy.direct import chunk
from proxy.events import Event
from proxy.hub import encode

from ..common import HOST
from .feed import Feed, peer_start

# The frames' stream position prefix: a constant of the proxy's length (the floor has
# no upstream log to name).
LOG_ID: Final = "f" * 32
HEAD: Final = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
MAX_HEAD: Final = 16_384


class Client(asyncio.Protocol):
    def __init__(self, server: FloorServer) -> None:
        self.server = server
        self.head: bytes | None = b""  # None once the response head went
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.head is None:  # streaming: the client has nothing more to say
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            if len(self.head) > MAX_HEAD:
                self.transport.close()
            return
        request, self.head = self.head, None
        if request.startswith(b"GET /readyz "):
            status = b"200 OK" if self.server.feed.ready else b"503 Service Unavailable"
            self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()
            return
        self.transport.write(HEAD)
        self.server.clients.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.server.clients.discard(self.transport)


class FloorServer:
    def __init__(self, upstream: str) -> None:
        self.clients: set[asyncio.Transport] = set()
        self.feed = Feed(upstream, self.publish)

    def publish(self, events: Sequence[Event]) -> None:
        data = b"".join(encode(LOG_ID, event) for event in events)
        if data:
            framed = chunk(data)
            for transport in tuple(self.clients):  # a failed write may drop one
                transport.write(framed)


async def serve(port: int, upstream: str) -> None:
    server = FloorServer(upstream)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: Client(server), HOST, port, backlog=4096)
    async with listener:
        await server.feed.run()


def main() -> None:
    args, _ = peer_start(__doc__.splitlines()[0])
    asyncio.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
