"""One caller's view of the state, in slices: what a stream's state write (stream.py)
and the JSON form (``GET <stream path>/state``) share.

A state holds up to ``state.max_entities`` sessions. Choosing and encoding what one
caller may see of 100,000 of them takes far longer than the event loop may be held,
so both walk the table's copy (``Hub.state_view``: references, taken atomically) in
slices of ``STATE_SLICE`` with a checkpoint between them; live events go on meanwhile.

Many streams writing a state at once (dashboards opening together, or all of them
resyncing after an upstream's new log) mostly write the same events in the same
shape: ``StateFrames`` encodes each (event, payload) once for all the writes in
progress, and forgets everything when the last one ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

import orjson
import trio

from . import sse
from .errors import RequestError
from .eventid import format_id
from .events import Event
from .hub import Hub, StateWrite
from .payloads import JSON_ENCODERS, Payload
from .policy import Filters, Principal
from .state import EntityKey, select

# Table events looked at, or state events encoded, between two checkpoints: a few
# milliseconds of work, so no state write holds the event loop for long.
STATE_SLICE: Final = 1000


class StateFrames:
    """A state's SSE frames (no ``id:``), encoded once per event and payload for every
    state write in progress; held only while one is (a storm's worth, then nothing).

    Keyed by the event's identity (events are immutable; the entry holds the event, so
    its id cannot be reused while the entry lives)."""

    def __init__(self) -> None:
        self._frames: dict[tuple[int, Payload], tuple[Event, bytes]] = {}
        self._writers = 0
        self.encoded = 0  # frames encoded (not found): how much sharing saved shows here

    def __len__(self) -> int:
        return len(self._frames)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """One state write in progress: the frames stay until the last one ends."""
        self._writers += 1
        try:
            yield
        finally:
            self._writers -= 1
            if not self._writers:
                self._frames.clear()

    def frame(self, event: Event, payload: Payload) -> bytes:
        key = (id(event), payload)
        hit = self._frames.get(key)
        if hit is not None and hit[0] is event:
            return hit[1]
        frame = sse.encode_json_event_without_id(event.name, JSON_ENCODERS[payload](event))
        self._frames[key] = (event, frame)
        self.encoded += 1
        return frame


def state_unavailable() -> RequestError:
    """The refusal of state (a stream's initialState=true, the JSON form) when the
    upstream has no snapshot to give."""
    return RequestError(
        503,
        "state-unavailable",
        "the upstream offers no snapshot, so no state can be given (initialState, /state)",
        {"Retry-After": "30"},
    )


def _never() -> bool:
    return False


async def choose(
    view: StateWrite,
    principal: Principal,
    filters: Filters,
    abandoned: Callable[[], bool] = _never,
) -> dict[EntityKey, Event] | None:
    """The newest event per entity this caller may see (``state.select``), in log
    order; None if ``abandoned()`` is true at a checkpoint (a newer state, a close)."""
    table = view.events
    chosen: dict[EntityKey, Event] = {}
    for start in range(0, len(table), STATE_SLICE):
        select(table[start : start + STATE_SLICE], principal, filters, chosen)
        await trio.lowlevel.checkpoint()
        if abandoned():
            return None
    return chosen


async def document(view: StateWrite, principal: Principal, filters: Filters) -> bytes:
    """The JSON form: ``{"position": id, "entities": N, "events": [{"event": name,
    "data": {...}}, ...]}``, each event's name and data exactly as the stream of the
    same generation and filters delivers them, in log order."""
    chosen = await choose(view, principal, filters)
    assert chosen is not None
    encoder = JSON_ENCODERS[filters.payload]
    items: list[bytes] = []
    for event in chosen.values():
        items.append(b'{"event":%s,"data":%s}' % (orjson.dumps(event.name), encoder(event)))
        if len(items) % STATE_SLICE == 0:
            await trio.lowlevel.checkpoint()
    position = orjson.dumps(format_id(view.log_id, view.sequence))
    return b'{"position":%s,"entities":%d,"events":[%s]}' % (
        position,
        len(items),
        b",".join(items),
    )


async def read(hub: Hub, principal: Principal, filters: Filters, wait: float) -> bytes:
    """The JSON form for one caller, once the hub has a state (at most ``wait``
    seconds: a proxy that has just started, or is reading its state on demand)."""
    hub.want_state()  # a read is a use: it keeps the state, or has it read
    view = hub.state_view()
    if view is None:
        with trio.move_on_after(wait):
            view = await hub.wait_state()
    if view is None:
        if hub.state_unavailable:
            raise state_unavailable()
        raise RequestError(
            503,
            "state-loading",
            "the state is being loaded from the upstream; try again shortly",
            {"Retry-After": "1"},
        )
    hub.state_reads += 1
    return await document(view, principal, filters)
