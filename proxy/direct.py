"""Direct body writes: an established HTTP/1.1 event stream written straight to its socket.

Why. Every event a client receives used to be one ASGI ``send``: quart -> hypercorn's
``HTTPStream`` -> h11 (chunk framing) -> ``TCPServer.protocol_send`` (a lock and a
shielded ``CancelScope``) -> Trio's ``SocketStream.send_all`` (a conflict detector and
two scheduler checkpoints), after a wake-up of the client's own task. With 1,000
clients at 100 events/s that was ~10.5 µs per write and a full core
(docs/benchmarks.md). The ``send`` system call itself is ~7 µs of it on loopback.

What. Once the response head is on the wire, the stream's body is plain HTTP/1.1
chunked encoding: ``<size hex>\\r\\n<data>\\r\\n``. A ``ChunkSink`` frames chunks itself
and the hub writes them from the publishing task with one non-blocking ``send`` per
client (``Hub.flush``); no task wakes up. Only when the kernel's send buffer is full
(or hypercorn is writing on this connection) does the rest go to the client's own
task, which waits for the socket under hypercorn's send lock. The end of the body
(``0\\r\\n\\r\\n``) is still written by h11, which did not count our chunks: chunked
framing carries no length to keep consistent.

When. Only where every condition holds; otherwise the stream takes the ASGI path,
which is correct everywhere and merely slower: a plain TCP connection (TLS and HTTP/2
frame the body themselves), h11 in ``SEND_BODY`` with its chunked writer (so the
client spoke HTTP/1.1 and the response has no length), a GET (a HEAD has no body).

Safety. The socket object, not its file descriptor number, is used: once hypercorn
closes it, ``send`` fails with EBADF instead of writing into whatever connection
reuses the number. Writes never interleave with hypercorn's: the synchronous path
backs off whenever hypercorn's send lock is held, and the asynchronous path holds it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from functools import partial
from typing import Any, Final

import h11
import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from .pacing import Pacer

_CONNECTION: Final[ContextVar[TCPServer | None]] = ContextVar("kep_connection", default=None)
_MSG_NOSIGNAL: Final = getattr(socket, "MSG_NOSIGNAL", 0)


def chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 section 7.1). ``payload`` must not be empty."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


class ChunkSink:
    """The socket of one HTTP/1.1 response body, for chunked writes from any task."""

    __slots__ = ("_lock", "_sock", "_stream", "gone")

    def __init__(self, stream: trio.SocketStream, sock: socket.socket, lock: trio.Lock) -> None:
        self._stream = stream
        self._sock = sock
        self._lock = lock
        # The client closed the connection: writes are dropped until the stream ends
        # (its end may wait its turn: see install).
        self.gone = False

    def try_write(self, data: bytes) -> bytes:
        """Write as much of ``data`` (framed bytes) as the socket takes now.

        Returns what is left (``b""`` when everything went); raises ``OSError`` when
        the connection is gone. Never blocks and never yields to the scheduler.
        """
        if self.gone:
            return b""
        if self._lock.locked():  # hypercorn (or this stream's task) is mid-write
            return data
        try:
            sent = self._sock.send(data, _MSG_NOSIGNAL)
        except BlockingIOError:
            return data
        return data[sent:] if sent < len(data) else b""

    async def write(self, data: bytes) -> None:
        """Write framed bytes, waiting for the socket; raises trio.BrokenResourceError."""
        async with self._lock:
            await self._stream.send_all(data)


def current_sink(scope: Mapping[str, Any]) -> ChunkSink | None:
    """This request's body as a ChunkSink, if it can be written directly (see above)."""
    server = _CONNECTION.get()
    if server is None or scope.get("method") != "GET" or scope.get("http_version") != "1.1":
        return None
    stream = server.stream
    sock = _plain_socket(stream)
    if sock is None or not isinstance(stream, trio.SocketStream):
        return None
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    connection = getattr(protocol, "connection", None)
    if not isinstance(connection, h11.Connection) or connection.our_state is not h11.SEND_BODY:
        return None
    if type(getattr(connection, "_writer", None)).__name__ != "ChunkedWriter":
        return None
    sink = ChunkSink(stream, sock, server.send_lock)
    server._kep_sink = sink
    return sink


def current_connection() -> TCPServer | None:
    """The hypercorn connection this task serves (None outside one)."""
    return _CONNECTION.get()


def client_left(server: TCPServer | None) -> bool:
    """Has this HTTP/1.x connection stopped being read (the client closed or reset it)?

    Then nothing written to it can arrive: a stream that ends for that reason skips
    the end of its body (h11's ``0\r\n\r\n``), which was a locked, shielded write and
    a second close per departed client, a third of what 4,000 leaving at once cost
    (docs/benchmarks.md). Hypercorn closes the socket when the connection's task ends.
    """
    return server is not None and getattr(server, "_kep_eof", False)


def on_eof(server: TCPServer, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` once the connection stops being read (the client closed it,
    reset it, or hypercorn closed it); at once if that already happened.

    Returns a function that unregisters it. For HTTP/1.x this is the client leaving:
    it cannot end one response without ending the connection. It lets a stream notice
    a departed client without a task of its own waiting on ASGI ``receive``.
    """
    if client_left(server):
        callback()
        return _nothing
    callbacks: list[Callable[[], None]] = server.__dict__.setdefault("_kep_on_eof", [])
    callbacks.append(callback)
    return partial(_forget, callbacks, callback)


def _forget(callbacks: list[Callable[[], None]], callback: Callable[[], None]) -> None:
    with contextlib.suppress(ValueError):
        callbacks.remove(callback)


def _nothing() -> None:
    pass


def install() -> None:
    """Patch hypercorn's trio ``TCPServer`` (idempotent):

    - ``run`` sets a context variable to the connection, which the app's task inherits
      (hypercorn spawns it from the connection's task), for ``current_sink``;
    - ``_read_data``, the connection's read loop, is replaced by ``_read_loop``.
    """
    original_run = TCPServer.run
    if getattr(original_run, "_kep_direct", False):
        return

    async def run(self: TCPServer) -> None:
        _CONNECTION.set(self)
        await original_run(self)

    run._kep_direct = True  # type: ignore[attr-defined]
    TCPServer.run = run  # type: ignore[method-assign]
    TCPServer._read_data = _read_loop  # type: ignore[method-assign]


async def _read_loop(self: TCPServer) -> None:
    """A connection's read loop: hypercorn's, with its end taken in turn.

    As hypercorn's: hand what arrives to the protocol; at the end of the input (or a
    read error or timeout) tell it, then ``Closed``. Two additions:

    - when the client closed, its direct stream's writes stop at once (``gone``), and
      the end is handled when the config's ``endings`` pacer (pacing.py) gives it its
      turn: thousands leaving together end a few dozen per scheduler batch, not all in
      each of the several batches an end takes;
    - the ``on_eof`` callbacks run once the protocol knows, however the loop ends.
    """
    ended_by_client = False
    timeout = self.config.read_timeout
    # Without a read timeout (this proxy's own config: a stream's client never sends
    # again), a plain socket is read with ``wait_readable`` and ``recv`` right here: no
    # cancel scope per read, and none of ``SocketStream.receive_some``'s layers, whose
    # frames an idle connection holds for as long as it is open (with hypercorn's
    # ``fail_after``, 2 KiB of each idle stream's memory).
    sock = _plain_socket(self.stream) if timeout is None else None
    try:
        while True:
            try:
                if sock is None:
                    data = await _receive_some(self.stream, timeout)
                else:
                    if sock.fileno() == -1:
                        raise trio.ClosedResourceError("the connection was closed")
                    await trio.lowlevel.wait_readable(sock)
                    received = _recv(sock)
                    if received is None:
                        continue
                    data = received
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            if not data:
                ended_by_client = True
                break
            await self.protocol.handle(RawData(data))
            del data  # not held while the connection idles (the request, for a stream)
        self._kep_eof = True  # type: ignore[attr-defined]
        sink: ChunkSink | None = self.__dict__.get("_kep_sink")
        if sink is not None:
            sink.gone = True
        endings: Pacer | None = getattr(self.config, "endings", None)
        if endings is not None:
            await endings.turn()
        if ended_by_client:
            await self.protocol.handle(RawData(b""))
        await self.protocol.handle(Closed())
    finally:
        self._kep_eof = True  # type: ignore[attr-defined]
        for callback in list(self.__dict__.get("_kep_on_eof", ())):
            callback()


async def _receive_some(stream: Any, read_timeout: float | None) -> bytes:
    if read_timeout is None:
        return bytes(await stream.receive_some(MAX_RECV))
    with trio.fail_after(read_timeout):
        return bytes(await stream.receive_some(MAX_RECV))


def _plain_socket(stream: Any) -> socket.socket | None:
    """The stdlib socket under a plain (not TLS) trio stream, else None."""
    sock = getattr(stream.socket, "_sock", None) if isinstance(stream, trio.SocketStream) else None
    return sock if isinstance(sock, socket.socket) else None


def _recv(sock: socket.socket) -> bytes | None:
    """What a readable socket holds (``b""``: the end), or None if nothing after all."""
    try:
        return sock.recv(MAX_RECV)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise trio.BrokenResourceError(str(exc)) from exc
