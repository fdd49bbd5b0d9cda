"""One client's event stream after admission: subscribe, write, notice the end, log.

Admission (authentication, filters, cursor, limits) is decided by the quart route
(admission.py), which hands back a ``StreamPlan``; guard.py then ends the quart request and calls
``StreamWriter.serve`` with the raw ASGI ``send``/``receive``. So a held stream
keeps none of quart's request machinery (its request and response objects, and the
nursery of two tasks quart-trio runs each request in), only what it needs:

- its ``Subscription`` in the hub (policy, filters, bounded outbox);
- the writer, on one of two paths. Direct (direct.py: plain HTTP/1.1): the hub writes
  the frames itself, and this task wakes only for what the hub cannot do (the
  opening position, catch-ups, a full socket, the end). ASGI (TLS, HTTP/2,
  HTTP/1.0): this task takes the outbox and ``send``s it, coalesced.
- the end of the client: for HTTP/1.x, the connection's read loop ending
  (``direct.on_eof``), which cancels the writer; for HTTP/2, where a client can
  reset one stream of a connection, a second task waiting for ``http.disconnect``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from . import direct, sse
from .eventid import Cursor
from .hub import (
    Hub,
    Outbox,
    StateWrite,
    Subscription,
    encode,
    gap_frame,
    state_begin_frame,
    state_end_frame,
)
from .metrics import Metrics
from .policy import Filters, Principal, visible
from .stateread import STATE_SLICE, StateFrames, choose
from .upstream import Fetched

log = logging.getLogger(__name__)

# Reads (after, until] of a log from the upstream, for clients older than the history.
Fetch = Callable[[str, int, int], Awaitable[Fetched]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Write = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """What admission decided: who, what they see, where they resume, how positioned."""

    principal: Principal
    filters: Filters
    cursor: Cursor | None
    positions: bool  # id-only position blocks (text/event-stream clients)
    peer: str | None
    api: str = "v4"  # the API generation (generations.Generation.name), for logs
    initial_state: bool = False  # initialState=true: the state first, resyncs for gaps


@dataclass(frozen=True)
class StreamWriter:
    hub: Hub
    fetch: Fetch
    metrics: Metrics
    # Encoded state frames shared by the state writes in progress (stateread.py).
    state_frames: StateFrames = field(default_factory=StateFrames)

    async def serve(
        self, plan: StreamPlan, scope: Mapping[str, Any], receive: Receive, send: Send
    ) -> None:
        """Write the stream's body (the response head is already sent) until it ends."""
        hub = self.hub
        started = time.monotonic()
        with hub.subscribe(
            plan.principal,
            plan.filters,
            plan.cursor,
            positions=plan.positions,
            state=plan.initial_state,
        ) as sub:
            # Taken with the subscription, atomically: everything up to here is not
            # this client's to receive, so a reconnect from here loses nothing. (A
            # state's end carries its position instead.)
            fresh = plan.positions and plan.cursor is None and not plan.initial_state
            start = hub.position() if fresh else None
            first = sse.encode_position(start) if start is not None else None
            if log.isEnabledFor(logging.INFO):
                fields = _log_fields(plan)
                log.info(
                    "stream open: %s (%s) filters=%s resume=%s",
                    plan.principal.access_key,
                    plan.principal.role.value,
                    fields["filters"],
                    fields["resume"],
                    extra={"event": "stream_open", **fields},
                )
                del fields  # made again at the end: an idle stream keeps as little as it can
            try:
                await self._until_gone(sub, scope, receive, send, first)
            finally:
                if log.isEnabledFor(logging.INFO):
                    _log_close(plan, sub, time.monotonic() - started)

    async def _until_gone(
        self,
        sub: Subscription,
        scope: Mapping[str, Any],
        receive: Receive,
        send: Send,
        first: bytes | None,
    ) -> None:
        connection = direct.current_connection()
        if connection is not None and scope.get("http_version") in ("1.0", "1.1"):
            # The client leaving ends the connection's read loop: no task needed. Only
            # here can the stream be written directly (HTTP/1.1, no TLS, a GET).
            sink = direct.current_sink(scope)
            with trio.CancelScope() as cancel:
                forget = direct.on_eof(connection, partial(_client_left, sub.outbox, cancel))
                try:
                    if sink is None:
                        await self._asgi(sub, send, first)
                    else:
                        # A write failing means the client went away mid-write.
                        with contextlib.suppress(
                            trio.BrokenResourceError, trio.ClosedResourceError
                        ):
                            await self._direct(sub, sink, first)
                finally:
                    forget()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await self._asgi(sub, send, first)
            nursery.cancel_scope.cancel()

    async def _asgi(self, sub: Subscription, send: Send, first: bytes | None) -> None:
        """The ASGI path: every write is an ASGI ``send`` (TLS, HTTP/2, HTTP/1.0)."""

        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if first is not None:
            await write(first)
        outbox = sub.outbox
        while True:
            # Heartbeats arrive through the outbox too (Hub.run_heartbeats).
            since = outbox.since
            owed = sub.catchup is not None or sub.state_write is not None
            frames = [] if owed else await outbox.take()
            epoch = sub.epoch
            # A state or a catch-up (set at subscribe time, or by a publish since)
            # comes before anything queued: those events are newer.
            while sub.catchup is not None or sub.state_write is not None:
                if sub.state_write is not None:
                    await self._write_state(sub, sub.state_write, write)
                    continue
                chunk = await self._catch_up(sub)
                if chunk:
                    await write(chunk)
            if sub.epoch != epoch:
                frames = []  # taken before a state that holds them
            if frames:
                self.metrics.delivery_latency.observe(time.monotonic() - since)
                # Coalesce: everything queued goes out in one write.
                await write(frames[0] if len(frames) == 1 else b"".join(frames))
            if outbox.closed and not len(outbox):
                return

    async def _direct(self, sub: Subscription, sink: direct.ChunkSink, first: bytes | None) -> None:
        """The direct path: the hub writes while this task idles (see direct.py).

        This task writes only what the hub cannot: the opening position, catch-ups,
        what a full socket did not take, and the end of a closed stream.
        """
        outbox = sub.outbox
        self.hub.attach_sink(sub, sink)  # busy: the hub queues for this task until idle
        if first is not None:
            await sink.write(direct.chunk(first))
            del first
        # What was written is let go before idling (no local keeps it): an idle stream
        # would hold its last write for as long as it is open.
        while True:
            if outbox.stalled:  # the rest of a frame: before anything else
                stalled, outbox.stalled = outbox.stalled, b""
                await sink.write(stalled)
                del stalled
            if sub.state_write is not None:
                await self._write_state(sub, sub.state_write, partial(_write_chunk, sink))
                continue
            while sub.catchup is not None:
                caught_up = await self._catch_up(sub)
                if caught_up:  # an empty chunk would end the body
                    await sink.write(direct.chunk(caught_up))
                caught_up = b""
            if len(outbox):
                since = outbox.since
                await sink.write(direct.chunk(b"".join(outbox.take_now())))
                self.metrics.delivery_latency.observe(time.monotonic() - since)
                continue
            if outbox.closed:
                return
            await outbox.idle()

    async def _write_state(self, sub: Subscription, plan: StateWrite, write: Write) -> None:
        """Write a state: begin, the latest visible event per entity, end (with its
        position). In slices, with checkpoints between them: live events queue
        meanwhile, and a newer state (a resync) ends this one where it is. Frames are
        shared with the other state writes in progress (``state_frames``)."""
        with self.state_frames.writing():
            await self._write_state_frames(sub, plan, write)

    async def _write_state_frames(self, sub: Subscription, plan: StateWrite, write: Write) -> None:

        def superseded() -> bool:
            if sub.outbox.closed and sub.state_write is plan:
                sub.state_write = None  # the stream is ending: the rest is moot
            return sub.state_write is not plan

        filters = sub.filters
        chosen = await choose(plan, sub.principal, filters, superseded)
        if chosen is None:
            return
        payload, frame = filters.payload, self.state_frames.frame
        frames = [state_begin_frame(plan.reason)]
        for event in chosen.values():
            frames.append(frame(event, payload))
            if len(frames) >= STATE_SLICE:
                await write(b"".join(frames))
                frames = []
                if superseded():
                    return
        frames.append(state_end_frame(plan.log_id, plan.sequence, len(chosen)))
        await write(b"".join(frames))
        if sub.state_write is plan:
            sub.state_write = None
        sub.outbox.sent += len(chosen)

    async def _catch_up(self, sub: Subscription) -> bytes:
        assert sub.catchup is not None
        cursor, until = sub.catchup
        fetched = await self.fetch(cursor.log_id, cursor.sequence, until)
        if fetched.gap is not None and sub.follows_state and sub.catchup == (cursor, until):
            self.hub.resync(sub)  # a state instead of the gap
            return b""
        out: list[bytes] = []
        if fetched.gap is not None:
            out.append(gap_frame(fetched.gap.reason, fetched.gap.after, fetched.gap.before))
        out.extend(
            encode(cursor.log_id, event, sub.filters.payload)
            for event in fetched.events
            if visible(sub.principal, sub.filters, event)
        )
        done = fetched.reached >= until or fetched.reached <= cursor.sequence
        sub.catchup = None if done else (Cursor(cursor.log_id, fetched.reached), until)
        sub.outbox.sent += len(out)
        return b"".join(out)


async def _write_chunk(sink: direct.ChunkSink, data: bytes) -> None:
    await sink.write(direct.chunk(data))


def _client_left(outbox: Outbox, cancel: trio.CancelScope) -> None:
    """End a stream whose client left. A direct writer idling in ``Outbox.idle`` (every
    quiet stream) is let return: closing its outbox wakes it, and it finds nothing to
    write. Only a writer in the middle of something (a write to a full socket, a
    catch-up) is cancelled. Raising ``Cancelled`` through a stream's dozen frames was a
    fifth of what 4,000 clients leaving at once cost (docs/benchmarks.md)."""
    if outbox.busy:
        cancel.cancel()
    else:
        outbox.discard()  # queued for a client that is gone
        outbox.close("client-gone")


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _log_close(plan: StreamPlan, sub: Subscription, seconds: float) -> None:
    duration = round(seconds, 3)
    reason = sub.outbox.reason or "client-gone"
    log.info(
        "stream closed: %s after %.1fs, %d events sent, reason=%s",
        plan.principal.access_key,
        duration,
        sub.outbox.sent,
        reason,
        extra={
            "event": "stream_close",
            **_log_fields(plan),
            "duration_s": duration,
            "events_sent": sub.outbox.sent,
            "reason": reason,
        },
    )


def _log_fields(plan: StreamPlan) -> dict[str, Any]:
    filters = plan.filters
    return {
        "access_key": plan.principal.access_key,
        "role": plan.principal.role.value,
        "api": plan.api,
        "filters": {
            "sessionId": filters.session,  # the name, as v4 calls it
            "ownerAccessKey": filters.owner,
            "group": filters.group,
            "sessionUuid": filters.session_uuid,
            "scope": filters.prefix,
        },
        "resume": str(plan.cursor) if plan.cursor else None,
        "initial_state": plan.initial_state,
        "peer": plan.peer,
    }
