"""Where every session stands: the latest event per entity, as a pure fold of the log.

One fold for every holder of state: the shipped upstream (over its protobuf messages,
as it appends), the proxy (over ``Event`` values, as the hub publishes), and the
snapshot between them. A snapshot is just the events the table holds, in log order:
folding them again gives the same table, so "snapshot, then changes" equals "the whole
log" by construction (and by property test).

An *entity* is a session (keyed by everything a visibility decision reads of it, so
two owners' same-named sessions, or a reused name with a new UUID, never mix) or, for
``kernel_*`` events on ``/events/session``, one of its kernels. What a stream is shown
of an entity depends on its filters (v4 never sees a cluster's sub-kernels; ``scope``
keeps one family), so the table keeps a session's latest event per *slot*:

- ``s``: its latest ``session_*`` event; ``o``: its latest event of any other family;
- ``m``: its latest ``kernel_*`` event of a main (or role-less) kernel, for v4;
- ``k``, per kernel id: that kernel's latest ``kernel_*`` event, for v5.

Within one slot every event is equally visible to any caller, so "the latest event
this stream would have delivered" for an entity is the newest visible one among its
slots (``select``). The table is a dict kept in order of last update, which is log
order: a state write walks it once and emits in that order.

A session whose latest event ends it (``*_terminated``, ``*_success``, ``*_failure``,
``*_cancelled``) is forgotten ``retention`` seconds after that event (its kernels
with it); past ``max_entities`` sessions the least recently updated one is forgotten.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final, Generic, Protocol, TypeVar

from .events import Event
from .payloads import KERNEL_PREFIX, SESSION_PREFIX, Payload
from .policy import Filters, Principal, visible

log = logging.getLogger(__name__)

TERMINAL_SUFFIXES: Final = ("_terminated", "_success", "_failure", "_cancelled")
_MAIN_ROLE: Final = "main"
PRUNE_EVERY: Final = 256


class Foldable(Protocol):
    """What the fold reads of an event: ``Event`` and ``pb.LifecycleEvent`` both fit."""

    @property
    def sequence(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def kernel_id(self) -> str: ...
    @property
    def owner_access_key(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def domain_name(self) -> str: ...
    @property
    def group_name(self) -> str: ...
    @property
    def session_uuid(self) -> str: ...
    @property
    def cluster_role(self) -> str: ...


E = TypeVar("E", bound=Foldable)
# owner key, name, UUID, user, domain, group: everything visibility reads of a session.
SessionKey = tuple[str, str, str, str, str, str]
SlotKey = tuple[SessionKey, str, str]  # (session, slot, kernel id for "k")
EntityKey = tuple[SessionKey, str | None]  # (session, kernel id on v5's kernel entities)


def session_key(event: Foldable) -> SessionKey:
    return (
        event.owner_access_key,
        event.session_id,
        event.session_uuid,
        event.user_id,
        event.domain_name,
        event.group_name,
    )


def terminal(name: str) -> bool:
    """Does an event of this name end its session (or kernel)?"""
    return name.endswith(TERMINAL_SUFFIXES)


def slots(key: SessionKey, event: Foldable) -> tuple[SlotKey, ...]:
    """The table slots an event of session ``key`` is the latest of."""
    name = event.name
    if name.startswith(KERNEL_PREFIX):
        kernel: SlotKey = (key, "k", event.kernel_id)
        role = event.cluster_role
        if role and role != _MAIN_ROLE:
            return (kernel,)
        return ((key, "m", ""), kernel)
    return ((key, "s" if name.startswith(SESSION_PREFIX) else "o", ""),)


def entity(event: Foldable, per_kernel: bool) -> EntityKey:
    """The entity an event is state of, for a stream with or without kernel entities."""
    key = session_key(event)
    if per_kernel and event.name.startswith(KERNEL_PREFIX):
        return (key, event.kernel_id)
    return (key, None)


def per_kernel(filters: Filters) -> bool:
    """Kernels are entities of their own on ``/events/session`` (v5), not on v4."""
    return filters.payload.generation is not Payload.V4


def select(
    events: Iterable[Event],
    principal: Principal,
    filters: Filters,
    into: dict[EntityKey, Event],
) -> None:
    """Fold table events (in log order) into ``into``: entity -> newest visible event.

    ``into`` stays in log order of its values (a newer event moves its entity to the
    end), so it can be written as it is. Called on slices of a table for big states.
    """
    kernels = per_kernel(filters)
    for event in events:
        if visible(principal, filters, event):
            key = entity(event, kernels)
            into.pop(key, None)
            into[key] = event


class _Session:
    __slots__ = ("keys", "latest")

    def __init__(self) -> None:
        self.keys: list[SlotKey] = []
        self.latest = 0  # sequence of its newest event


class State(Generic[E]):
    """The fold: latest events per session slot, at a log position. Pure bookkeeping
    (the clock is injected), not thread-safe: its owner serialises access."""

    def __init__(
        self,
        *,
        retention: float,
        max_entities: int,
        stamp: Callable[[E], float],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.retention = retention
        self.max_entities = max_entities
        self._stamp = stamp
        self._clock = clock
        self._table: dict[SlotKey, E] = {}  # in order of last update: log order
        self._sessions: dict[SessionKey, _Session] = {}  # least recently updated first
        self._expiry: list[tuple[float, int, SessionKey]] = []  # (when, sequence, session)
        self.log_id: str | None = None
        self.sequence = 0  # every event up to this one of log_id is folded in
        self.evicted = 0  # sessions forgotten because of max_entities
        self.expired = 0  # sessions forgotten after retention
        self._warned = False
        self._unchecked = 0  # events applied since the clock was last read

    def __len__(self) -> int:
        """Sessions held (a session's kernels count with it)."""
        return len(self._sessions)

    @property
    def slots_held(self) -> int:
        return len(self._table)

    def reset(self, log_id: str, sequence: int) -> None:
        """Empty, at a position (a new log: nothing of it known yet)."""
        self._table.clear()
        self._sessions.clear()
        self._expiry.clear()
        self.log_id, self.sequence = log_id, sequence

    def apply(self, event: E) -> None:
        """Fold one event in (the caller gives them in log order)."""
        key = session_key(event)
        sessions = self._sessions
        session = sessions.pop(key, None)
        if session is None:
            session = _Session()
            if len(sessions) >= self.max_entities:
                self._evict()
        sessions[key] = session  # most recently updated: last
        table = self._table
        for slot in slots(key, event):
            if table.pop(slot, None) is None:
                session.keys.append(slot)
            table[slot] = event
        sequence = event.sequence
        session.latest = sequence
        self.sequence = sequence
        expiry = self._expiry
        if event.name.endswith(TERMINAL_SUFFIXES):  # terminal(), inlined: every event
            stamp = self._stamp(event) or self._clock()
            heapq.heappush(expiry, (stamp + self.retention, sequence, key))
        # The clock is read once per PRUNE_EVERY events, not per event: time.time()
        # costs about a microsecond on some virtual machines, as much as the rest of
        # apply. Expired sessions linger that many events at most; every read of the
        # table (events()) prunes first.
        self._unchecked += 1
        if self._unchecked >= PRUNE_EVERY and expiry:
            self._unchecked = 0
            if expiry[0][0] <= self._clock():
                self.prune()

    def prune(self, now: float | None = None) -> int:
        """Forget sessions whose terminal event is older than the retention."""
        now = self._clock() if now is None else now
        heap, forgotten = self._expiry, 0
        while heap and heap[0][0] <= now:
            _, sequence, key = heapq.heappop(heap)
            session = self._sessions.get(key)
            if session is not None and session.latest == sequence:  # still its latest
                self._forget(key)
                forgotten += 1
        self.expired += forgotten
        return forgotten

    def _evict(self) -> None:
        key = next(iter(self._sessions))
        self._forget(key)
        self.evicted += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "state: %d sessions held (state.max_entities): forgetting the least recently "
                "updated ones from now on (counted in kep_state_evicted_sessions)",
                self.max_entities,
            )

    def _forget(self, key: SessionKey) -> None:
        session = self._sessions.pop(key)
        for slot in session.keys:
            del self._table[slot]

    def events(self) -> list[E]:
        """The table's events in log order; one in two slots appears twice, adjacent.

        A plain copy of references (fast even for big tables): a state write walks it
        in slices while the live table moves on.
        """
        if self._expiry and self._expiry[0][0] <= self._clock():
            self.prune()
        return list(self._table.values())

    def snapshot(self) -> Iterator[E]:
        """Each held event once, in log order: what folds back into this table."""
        previous: E | None = None
        for event in self.events():
            if event is not previous:
                yield event
            previous = event


def fold(
    events: Iterable[E],
    *,
    retention: float,
    max_entities: int,
    stamp: Callable[[E], float],
    clock: Callable[[], float] = time.time,
) -> State[E]:
    """A state built from events in log order (a whole log, or a snapshot)."""
    state: State[E] = State(
        retention=retention, max_entities=max_entities, stamp=stamp, clock=clock
    )
    for event in events:
        state.apply(event)
    return state
