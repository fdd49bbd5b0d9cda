"""A load generator: one process holding many SSE connections, driven over stdin.

    python -m bench.loadgen        (started by the harness; commands are JSON lines)

Clients are bare asyncio protocols (uvloop when it is installed) that parse no more
than they must: a delivery is a line starting ``event: kernel_`` (every upstream event
is a lifecycle event, on every system), counted with ``bytes.count`` over complete
lines; with latency on, the ``t=<send time>`` stamps in those lines are read too and
``time.time()`` at receipt minus the stamp goes into a mergeable histogram. The
stamps are parsed at ``report``, not on receipt: while events arrive the client does
no more than count and keep (receipt time, lines), so the instrument's own cost per
delivery (the kernel's read aside) stays small beside what it measures.

Commands: ``connect`` (open N streams and keep them), ``reset`` (zero the counters),
``report``, ``churn`` (connect, read the response head, close; N times), ``close``,
``storm`` (drop every held stream and reconnect them all at once, each with the
``Last-Event-ID`` it last saw) and ``tally`` (per client: which events were missed or
received twice). Streams connected with ``track`` keep the index of every event they
receive (its ``kernelId``, unique per event of a ``send``) and their last ``id:``.
``dashboards`` (open N ``initialState=true`` streams at once and keep them; for each,
the seconds until its ``stream_state_end`` and the bytes of its state).
Requests to this proxy are signed with ``proxy.signing.sign_headers``, once per
connection.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any, Final, cast

from proxy.signing import sign_headers

from .common import (
    DELIVERY_MARK,
    HOST,
    OVERFLOW_MARK,
    STATE_END_MARK,
    SUPER_KEY,
    SUPER_SECRET,
    Json,
    command_loop,
    latency_bucket,
    raise_fd_limit,
    self_cpu_seconds,
    user_key,
    user_secret,
)

_STAMP_RE: Final = re.compile(rb"t=(\d+\.\d+)")
# An event's index in a send (bench.common.lifecycle_event: kernel_id = k<i>), in any
# system's JSON, compact or not; and an SSE id line.
_INDEX_RE: Final = re.compile(rb'"kernelId":\s*"k(\d+)"')
_ID_RE: Final = re.compile(rb"^id: ?(\S+)$", re.MULTILINE)
_HEAD_END: Final = b"\r\n\r\n"


class Stats:
    def __init__(self) -> None:
        self.latency = False
        self.reset(False)

    def reset(self, latency: bool) -> None:
        self.latency = latency
        self.deliveries = 0
        self.overflows = 0
        self.first = 0.0
        self.last = 0.0
        self.hist: dict[int, int] = {}
        self.samples: list[tuple[float, bytes]] = []  # (receipt time, lines) to parse

    def histogram(self) -> dict[int, int]:
        """The latency histogram so far (parses the samples kept since the last call)."""
        hist = self.hist
        for now, lines in self.samples:
            for stamp in _STAMP_RE.findall(lines):
                bucket = latency_bucket(now - float(stamp))
                hist[bucket] = hist.get(bucket, 0) + 1
        self.samples.clear()
        return hist

    def on_lines(self, lines: bytes, now: float) -> None:
        n = lines.count(b"\n" + DELIVERY_MARK) + lines.startswith(DELIVERY_MARK)
        if OVERFLOW_MARK in lines:
            self.overflows += lines.count(OVERFLOW_MARK)
        if not n:
            return
        self.deliveries += n
        if not self.first:
            self.first = now
        self.last = now
        if self.latency:
            self.samples.append((now, lines))


def build_request(
    port: int, path: str, auth: str, index: int, last_event_id: str | None = None
) -> bytes:
    """One GET; ``path`` may hold ``{ak}`` (the index's user key); ``auth`` is
    ``none``, ``super`` or ``user`` (this proxy's HMAC signature, made here)."""
    host = f"{HOST}:{port}"
    target = path.format(ak=user_key(index))
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream"]
    if last_event_id is not None:
        lines.append(f"Last-Event-ID: {last_event_id}")
    if auth != "none":
        access, secret = (
            (SUPER_KEY, SUPER_SECRET) if auth == "super" else (user_key(index), user_secret(index))
        )
        headers = sign_headers(
            method="GET",
            raw_target=target,
            host=host,
            access_key=access,
            secret_key=secret,
            date=datetime.now(UTC),
        )
        lines.extend(f"{k}: {v}" for k, v in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Track:
    """What one client (across its reconnections) received: event indices, last id."""

    __slots__ = ("index", "last_id", "seen")

    def __init__(self, index: int) -> None:
        self.index = index  # which client (its request's user index)
        self.seen: list[int] = []
        self.last_id: str | None = None

    def on_lines(self, lines: bytes) -> None:
        self.seen.extend(int(i) for i in _INDEX_RE.findall(lines))
        ids = _ID_RE.findall(lines)
        if ids:
            self.last_id = ids[-1].decode()


class StreamClient(asyncio.Protocol):
    """One held SSE stream: parses the response head, then counts deliveries.

    A dashboard (``live`` given) also counts the body's bytes until its state's end,
    and sets ``live`` to the time it came."""

    def __init__(
        self,
        stats: Stats,
        request: bytes,
        lost: list[int],
        track: Track | None = None,
        live: asyncio.Future[float] | None = None,
    ) -> None:
        self.stats = stats
        self.request = request
        self.lost = lost
        self.track = track
        self.admitted = 0.0  # when the response head arrived
        self.head = b""
        self.rest = b""
        self.streaming = False  # the response head was read
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.live = live
        self.state_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self.streaming:
            if self.ready.done():
                return
            self.head += data
            end = self.head.find(_HEAD_END)
            if end < 0:
                return
            ok = self.head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
            data, self.head = self.head[end + 4 :], b""
            self.streaming = ok
            self.admitted = now
            self.ready.set_result(ok)
            if not ok:
                assert self.transport is not None
                self.transport.close()
                return
        buf = self.rest + data if self.rest else data
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            self.rest = buf
            return
        self.rest = buf[cut:]
        lines = buf[:cut] if cut < len(buf) else buf
        self.stats.on_lines(lines, now)
        if self.track is not None:
            self.track.on_lines(lines)
        live = self.live
        if live is not None and not live.done():
            self.state_bytes += len(lines)
            if STATE_END_MARK in lines:
                live.set_result(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_result(False)
        if self.live is not None and not self.live.done():
            self.live.cancel()
        self.lost[0] += 1


def _same(client: ChurnClient) -> ChurnClient:
    return client


class ChurnClient(asyncio.Protocol):
    """Connect, send the request, read the response head, close (FIN)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head = b""
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self.head += data
        if _HEAD_END in self.head:
            self.done.set_result(self.head.startswith(b"HTTP/1.1 200"))
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


class LoadGen:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stats = Stats()
        self.clients: list[StreamClient] = []
        self.lost = [0]
        self.failed = 0
        self.where: tuple[int, str, str] = (0, "", "none")

    async def handle(self, cmd: Json) -> Json:
        op = cmd["op"]
        if op == "connect":
            return await self.connect(cmd)
        if op == "reset":
            self.stats.reset(bool(cmd.get("latency", False)))
            return {"ok": True, "cpu": self_cpu_seconds()}
        if op == "report":
            return self.report(bool(cmd.get("hist", False)))
        if op == "churn":
            return await self.churn(cmd)
        if op == "storm":
            return await self.storm(cmd)
        if op == "tally":
            return self.tally(int(cmd["count"]))
        if op == "dashboards":
            return await self.dashboards(cmd)
        if op == "close":
            for client in self.clients:
                if client.transport is not None:
                    client.transport.close()
            self.clients.clear()
            await asyncio.sleep(0.2)
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    def report(self, hist: bool) -> Json:
        s = self.stats
        out: dict[str, Any] = {
            "deliveries": s.deliveries,
            "overflows": s.overflows,
            "first": s.first,
            "last": s.last,
            "held": len(self.clients),
            "lost": self.lost[0],
            "failed": self.failed,
            "cpu": self_cpu_seconds(),
        }
        if hist:
            out["hist"] = {str(k): v for k, v in s.histogram().items()}
        return out

    async def connect(self, cmd: Json) -> Json:
        port, path, auth = int(cmd["port"]), str(cmd["path"]), str(cmd.get("auth", "none"))
        start, count = int(cmd.get("start", 0)), int(cmd["count"])
        limiter = asyncio.Semaphore(int(cmd.get("concurrency", 100)))
        deadline = time.monotonic() + float(cmd.get("timeout", 120))
        began = time.monotonic()
        ok = 0

        track = bool(cmd.get("track", False))
        self.where = (port, path, auth)

        async def one(i: int) -> None:
            nonlocal ok
            async with limiter:
                if time.monotonic() > deadline:
                    self.failed += 1
                    return
                client = await self.open(i, Track(i) if track else None, patience=30)
                if client is not None:
                    ok += 1
                    self.clients.append(client)
                else:
                    self.failed += 1

        await asyncio.gather(*(one(i) for i in range(start, start + count)))
        return {"connected": ok, "held": len(self.clients), "elapsed": time.monotonic() - began}

    async def open(
        self, i: int, track: Track | None, *, patience: float, last_event_id: str | None = None
    ) -> StreamClient | None:
        """One stream to the last ``connect``'s system, held once its head says 200;
        ``patience``: seconds for the connection, then as many for the head."""
        port, path, auth = self.where
        request = build_request(port, path, auth, i, last_event_id)
        client = StreamClient(self.stats, request, self.lost, track)
        try:
            connecting = self.loop.create_connection(lambda: client, HOST, port)
            await asyncio.wait_for(connecting, patience)
            good = await asyncio.wait_for(client.ready, patience)
        except (OSError, TimeoutError):
            good = False
        if not good and client.transport is not None:
            client.transport.close()
        return client if good else None

    async def storm(self, cmd: Json) -> Json:
        """Every held stream drops, then all reconnect at once with their last id."""
        patience = float(cmd.get("timeout", 120))
        old, self.clients = self.clients, []
        dropped = time.time()
        for client in old:
            if client.transport is not None:
                client.transport.close()
        self.lost[0] -= len(old)  # these were dropped on purpose

        async def again(client: StreamClient) -> StreamClient | None:
            track = client.track
            index = track.index if track is not None else 0
            last = track.last_id if track is not None else None
            return await self.open(index, track, patience=patience, last_event_id=last)

        back = await asyncio.gather(*(again(c) for c in old))
        self.clients = [c for c in back if c is not None]
        return {
            "dropped_at": dropped,
            "readmitted_at": max((c.admitted for c in self.clients), default=dropped),
            "admitted": [c.admitted for c in self.clients],
            "reconnected": len(self.clients),
            "failed": len(old) - len(self.clients),
        }

    def tally(self, count: int) -> Json:
        """Per tracked client, against events 0..count-1 of the last send."""
        lost, duplicated, with_loss, with_dups, have_last = [], [], 0, 0, 0
        for client in self.clients:
            if client.track is None:
                continue
            seen = client.track.seen
            distinct = {i for i in seen if i < count}
            missing = count - len(distinct)
            twice = len(seen) - len(set(seen))
            lost.append(missing)
            duplicated.append(twice)
            with_loss += missing > 0
            with_dups += twice > 0
            have_last += (count - 1) in distinct
        return {
            "clients": len(lost),
            "lost": sum(lost),
            "lost_max": max(lost, default=0),
            "clients_with_loss": with_loss,
            "duplicated": sum(duplicated),
            "duplicated_max": max(duplicated, default=0),
            "clients_with_duplicates": with_dups,
            "have_last": have_last,
        }

    async def dashboards(self, cmd: Json) -> Json:
        """Open ``count`` streams at once (no concurrency limit: a storm); wait until
        each one's state has ended (or ``timeout``); keep them open."""
        port, path, auth = int(cmd["port"]), str(cmd["path"]), str(cmd.get("auth", "none"))
        start, count = int(cmd.get("start", 0)), int(cmd["count"])
        timeout = float(cmd.get("timeout", 60))
        began = time.time()
        clients = [
            StreamClient(
                self.stats,
                build_request(port, path, auth, i),
                self.lost,
                live=self.loop.create_future(),
            )
            for i in range(start, start + count)
        ]

        async def one(client: StreamClient) -> float | None:
            try:
                await asyncio.wait_for(self.loop.create_connection(lambda: client, HOST, port), 30)
                assert client.live is not None
                return await asyncio.wait_for(client.live, timeout) - began
            except (OSError, TimeoutError, asyncio.CancelledError):
                return None

        seconds = await asyncio.gather(*(one(c) for c in clients))
        self.clients.extend(c for c in clients if c.streaming)
        live = [(t, c.state_bytes) for t, c in zip(seconds, clients, strict=True) if t is not None]
        return {
            "connected": sum(c.streaming for c in clients),
            "live": len(live),
            "seconds": [t for t, _ in live],
            "state_bytes": [b for _, b in live],
        }

    async def churn(self, cmd: Json) -> Json:
        port, path, auth = int(cmd["port"]), str(cmd["path"]), str(cmd.get("auth", "none"))
        cycles = int(cmd["cycles"])
        deadline = time.monotonic() + float(cmd.get("timeout", 60))
        started = 0
        done = 0
        failed = 0

        async def worker(w: int) -> None:
            nonlocal started, done, failed
            while started < cycles and time.monotonic() < deadline:
                i = started
                started += 1
                client = ChurnClient(build_request(port, path, auth, i))
                try:
                    await asyncio.wait_for(
                        self.loop.create_connection(functools.partial(_same, client), HOST, port),
                        10,
                    )
                    good = await asyncio.wait_for(client.done, 10)
                except (OSError, TimeoutError):
                    good = False
                    if client.transport is not None:
                        client.transport.close()
                if good:
                    done += 1
                else:
                    failed += 1

        began = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(int(cmd.get("concurrency", 32)))))
        return {"cycles": done, "failed": failed, "elapsed": time.monotonic() - began}


def main() -> None:
    raise_fd_limit()
    try:
        import uvloop
    except ImportError:  # the smoke test runs without the bench extra
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    gen = LoadGen(loop)
    thread = threading.Thread(target=loop.run_forever, name="loadgen-loop", daemon=True)
    thread.start()

    def handle(cmd: Json) -> Json:
        return asyncio.run_coroutine_threadsafe(gen.handle(cmd), loop).result()

    command_loop(handle)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


if __name__ == "__main__":
    main()
