"""A real proxy on a loopback socket, run by Trio in a thread of its own.

Property-based tests (hypothesis, schemathesis) drive many examples from synchronous
code; an async fixture's proxy lives in one ``trio.run`` and cannot outlast an example.
This one runs for a whole module: hypercorn, the hub and the upstream bridge in their
own ``trio.run`` in a background thread, the in-process gRPC upstream beside them.

``raw_request`` sends exact bytes over a fresh TCP connection and reads one response,
for inputs an HTTP client library would refuse or normalise.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio

from proxy.config import Settings
from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import EventLog, UpstreamServer

from .conftest import make_settings
from .helpers import wait_until

T = TypeVar("T")


@dataclass
class LiveProxy:
    url: str
    upstream: UpstreamServer
    running: RunningProxy
    token: trio.lowlevel.TrioToken

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the proxy's Trio thread (to read or poke the hub safely)."""
        return trio.from_thread.run_sync(fn, trio_token=self.token)


@contextmanager
def live_proxy(
    settings: Callable[[str], Settings] | None = None, *, capacity: int = 100_000
) -> Iterator[LiveProxy]:
    upstream = UpstreamServer(EventLog(capacity=capacity), "127.0.0.1:0")
    upstream.start()
    ready: queue.Queue[tuple[RunningProxy, trio.lowlevel.TrioToken] | BaseException] = queue.Queue()
    config = (settings or make_settings)(upstream.target)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            running: RunningProxy = await nursery.start(run_proxy, config)
            await wait_until(lambda: running.bridge.live, timeout=30)
            ready.put((running, trio.lowlevel.current_trio_token()))

    def main() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # handed to the test thread
            ready.put(exc)

    thread = threading.Thread(target=main, name="live-proxy", daemon=True)
    thread.start()
    try:
        started = ready.get(timeout=60)
        if isinstance(started, BaseException):
            raise started
        running, token = started
        try:
            yield LiveProxy(running.url, upstream, running, token)
        finally:
            trio.from_thread.run_sync(running.shutdown, trio_token=token)
            thread.join(timeout=30)
            assert not thread.is_alive(), "the proxy did not shut down"
    finally:
        upstream.stop(0)


# --- A raw HTTP/1.1 exchange ------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool = False  # the server closed the connection after it
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(url: str, data: bytes, *, timeout: float = 5.0) -> RawResponse:
    """Send ``data`` as is on a new connection; read one response's head and body.

    An event stream (200, text/event-stream) is not read past its head: it never ends.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock, head_only=data.startswith(b"HEAD "))


def read_response(sock: socket.socket, *, head_only: bool = False) -> RawResponse:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response head: {buffer!r}")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    response = RawResponse(status, headers, b"")
    if head_only:
        return response
    if status == 200 and (response.header("content-type") or "").startswith("text/event-stream"):
        response.body = rest
        return response
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        response.body, response.closed = _read_chunked(sock, rest)
    else:
        length = int(response.header("content-length") or 0)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        response.body = rest[:length]
    return response


def _read_chunked(sock: socket.socket, data: bytes) -> tuple[bytes, bool]:
    body = b""
    while True:
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return body, True
            data += chunk
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(data) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                return body + data[:size], True
            data += chunk
        body, data = body + data[:size], data[size + 2 :]
        if size == 0:
            return body, False
