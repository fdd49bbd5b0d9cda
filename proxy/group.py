"""What the app asks of its process, or of the group of workers it is one of.

Stream slots, login buckets, ``/metrics``, ``/healthz`` and ``/readyz`` are a
process's own when it serves alone (``SingleProcess``). In a group (``serve --workers
N``, supervisor.py) they are the group's: a worker asks its supervisor over a Unix
socket (``WorkerGroup``), so a limit holds for the group as configured, a cookie from
one worker is good on every other (they share the settings, generated keys included)
and a scrape sees every worker, whichever one answers it.

``Link`` is that socket, for both ends: one JSON object per line (``Frames``, pure);
a message with ``op`` is a request (with an ``id`` when it wants an answer), one with
``re`` answers the request of that ``id``. Writes go through a queue, so giving back a
slot (``post``) never waits.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final, Protocol

import orjson
import trio

from .config import LimitsSettings
from .errors import RequestError
from .limits import Ledger, StreamLimitExceeded
from .metrics import Metrics
from .upstream import UpstreamBridge

log = logging.getLogger(__name__)

Message = dict[str, Any]
# A request unanswered this long means the other end is stuck: the caller gets a 503.
REQUEST_TIMEOUT: Final = 10.0
# Bounds what one end buffers of a message still arriving (a metrics snapshot is ~10 KiB).
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
_READ_SIZE: Final = 65536


class Shared(Protocol):
    """What admission, login and the operational routes ask of their process or group."""

    async def acquire_stream(self, key: str) -> None:
        """Take a stream slot for ``key``, or raise ``limits.StreamLimitExceeded``."""

    def release_stream(self, key: str) -> None: ...

    async def login_attempt(self, address: str) -> float:
        """Count a login attempt from ``address``, or the seconds it must wait first."""

    async def login_wait(self, access_key: str) -> float: ...

    def login_failed(self, access_key: str) -> None: ...

    async def metrics(self) -> bytes:
        """Prometheus text for the process or the whole group."""

    async def health(self) -> tuple[int, Message]: ...

    async def readiness(self) -> tuple[int, Message]: ...


def ledger_for(limits: LimitsSettings) -> Ledger:
    return Ledger(
        max_streams_per_key=limits.max_streams_per_key,
        max_streams=limits.max_streams,
        login_attempts_per_address=limits.login_attempts_per_address,
        login_failures_per_key=limits.login_failures_per_key,
        login_window=limits.login_window,
    )


def readiness(live: bool, workers: Message | None = None) -> tuple[int, Message]:
    """``/readyz``: 200 while the upstream stream is live (in a group: in every worker)."""
    body: Message = {"status": "ready" if live else "upstream-unavailable", "upstream": live}
    if workers is not None:
        body["workers"] = workers
    return (200 if live else 503), body


class SingleProcess:
    """A process serving alone: its own ledger, metrics and upstream bridge."""

    def __init__(self, limits: LimitsSettings, metrics: Metrics, bridge: UpstreamBridge) -> None:
        self.ledger = ledger_for(limits)
        self._metrics = metrics
        self._bridge = bridge

    async def acquire_stream(self, key: str) -> None:
        # No checkpoint: taken synchronously, so a burst cannot overshoot a cap.
        self.ledger.acquire(key)

    def release_stream(self, key: str) -> None:
        self.ledger.release(key)

    async def login_attempt(self, address: str) -> float:
        return self.ledger.login_attempt(address)

    async def login_wait(self, access_key: str) -> float:
        return self.ledger.login_wait(access_key)

    def login_failed(self, access_key: str) -> None:
        self.ledger.login_failed(access_key)

    async def metrics(self) -> bytes:
        return self._metrics.render()

    async def health(self) -> tuple[int, Message]:
        return 200, {"status": "ok"}

    async def readiness(self) -> tuple[int, Message]:
        return readiness(self._bridge.live)


# --- The link between a supervisor and a worker ---------------------------------------


class LinkClosed(Exception):
    """The other end of the link is gone."""


class Frames:
    """A byte stream cut into messages: one JSON object per line (orjson never writes a
    raw newline inside one)."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = b""
        self._limit = limit

    def feed(self, data: bytes | bytearray) -> list[Message]:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if len(self._buffer) > self._limit:
            raise ValueError(f"a message longer than {self._limit} bytes")
        return [orjson.loads(line) for line in lines if line]


def encode(message: Mapping[str, Any]) -> bytes:
    return orjson.dumps(message) + b"\n"


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    reply: Message | None = None
    # Set when the asker stopped waiting (cancelled, timed out): gets the late answer.
    late: Callable[[Message], None] | None = None


Handler = Callable[[Message], Message | None]


class Link:
    """Requests and answers over a stream, both ways (see the module docstring)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._frames = Frames()
        self._early: list[Message] = []
        self._out_send, self._out = trio.open_memory_channel[bytes](math.inf)
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self.closed = False

    def post(self, message: Mapping[str, Any]) -> None:
        """Queue a message; it is written in order, without waiting."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._out_send.send_nowait(encode(message))  # or the link is gone: nobody to tell

    def reply(self, request: Message, body: Mapping[str, Any]) -> None:
        if "id" in request:
            self.post({**body, "re": request["id"]})

    async def request(
        self,
        message: Mapping[str, Any],
        *,
        late: Callable[[Message], None] | None = None,
    ) -> Message:
        """Send ``message`` and wait for its answer (or ``LinkClosed``). An answer that
        arrives after the caller stopped waiting (cancelled: the caller's deadline) goes
        to ``late``, to give back what it granted."""
        if self.closed:
            raise LinkClosed
        ident = next(self._ids)
        pending = self._pending[ident] = _Pending()
        self.post({**message, "id": ident})
        try:
            await pending.done.wait()
        except BaseException:
            if pending.reply is not None and late is not None:
                late(pending.reply)  # answered, but the caller is no longer there
            else:
                pending.late = late
            raise
        if pending.reply is None:
            raise LinkClosed
        return pending.reply

    async def receive_first(self) -> Message:
        """The first message, before ``run`` (a worker's start-up settings)."""
        while not self._early:
            data = await self._stream.receive_some(_READ_SIZE)
            if not data:
                raise LinkClosed
            self._early = self._frames.feed(data)
        return self._early.pop(0)

    async def run(self, handle: Handler) -> None:
        """Read and write until either end closes. Answers wake their requests; a
        request goes to ``handle``, whose result (when not None) is sent as its answer."""
        try:
            async with trio.open_nursery() as nursery:

                async def write_then_stop() -> None:
                    await self._write()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(write_then_stop)
                await self._read(handle)
                nursery.cancel_scope.cancel()
        finally:
            self._close()

    async def _read(self, handle: Handler) -> None:
        early, self._early = self._early, []
        for message in early:
            self._dispatch(message, handle)
        while True:
            try:
                data = await self._stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            for message in self._frames.feed(data):
                self._dispatch(message, handle)

    def _dispatch(self, message: Message, handle: Handler) -> None:
        if "re" in message:
            pending = self._pending.pop(message["re"], None)
            if pending is not None:
                pending.reply = message
                pending.done.set()
                if pending.late is not None:
                    pending.late(message)
            return
        answer = handle(message)
        if answer is not None:
            self.reply(message, answer)

    async def _write(self) -> None:
        async for data in self._out:
            batch = [data]
            while True:  # everything queued goes out in one write
                try:
                    batch.append(self._out.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self._stream.send_all(b"".join(batch))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    def _close(self) -> None:
        self.closed = True
        self._out.close()
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.done.set()  # reply None: LinkClosed


# --- A worker's side ------------------------------------------------------------------


@dataclass
class WorkerGroup:
    """One worker of a group: the group's limits, metrics and health, asked of the
    supervisor over ``link``; ``listen`` and ``metrics_listen`` are the inherited
    listening sockets' descriptors."""

    link: Link
    _: KW_ONLY
    index: int
    workers: int
    listen: list[int]
    metrics_listen: list[int]

    async def run(self, report: Callable[[], Message]) -> None:
        """Serve the supervisor's questions (``report``: this worker's state) until the
        link closes."""

        def handle(message: Message) -> Message | None:
            if message.get("op") == "report":
                return report()
            log.warning("unknown message from the supervisor: %r", message.get("op"))
            return None

        await self.link.run(handle)

    def ready(self) -> None:
        self.link.post({"op": "ready"})

    async def _ask(
        self, message: Message, late: Callable[[Message], None] | None = None
    ) -> Message:
        try:
            return await self.link.request(message, late=late)
        except (LinkClosed, trio.TooSlowError):
            raise RequestError(
                503, "supervisor-unavailable", "this worker cannot reach its supervisor"
            ) from None

    async def acquire_stream(self, key: str) -> None:
        def give_back(answer: Message) -> None:
            if "refused" not in answer:
                self.release_stream(key)  # granted after the request gave up

        answer = await self._ask({"op": "acquire", "key": key}, late=give_back)
        refused = answer.get("refused")
        if refused is not None:
            raise StreamLimitExceeded(refused["status"], refused["error"], refused["detail"])

    def release_stream(self, key: str) -> None:
        self.link.post({"op": "release", "key": key})

    async def login_attempt(self, address: str) -> float:
        return float((await self._ask({"op": "login_attempt", "address": address}))["wait"])

    async def login_wait(self, access_key: str) -> float:
        return float((await self._ask({"op": "login_wait", "key": access_key}))["wait"])

    def login_failed(self, access_key: str) -> None:
        self.link.post({"op": "login_failed", "key": access_key})

    async def metrics(self) -> bytes:
        return str((await self._ask({"op": "metrics"}))["text"]).encode()

    async def health(self) -> tuple[int, Message]:
        answer = await self._ask({"op": "health"})
        return 200, {"status": "ok", "worker": self.index, "workers": answer["workers"]}

    async def readiness(self) -> tuple[int, Message]:
        answer = await self._ask({"op": "readiness"})
        return readiness(bool(answer["live"]), answer["workers"])


def metrics_asgi(render: Callable[[], Awaitable[bytes]], content_type: str) -> Any:
    """A bare ASGI app answering every request with ``render()`` (a group's
    ``server.metrics_bind``, where prometheus-client's app would show one worker)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rpartition(".")[2]  # startup / shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        body = await render()
        headers = [(b"content-type", content_type.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app
