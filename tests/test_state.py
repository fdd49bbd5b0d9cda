"""The state fold against the plainest reference: a client that saw the whole log.

A client that applies the state (the latest visible event per entity, in log order)
must end with the same latest-event-per-entity map as a client that received every
visible event since the log began, whatever its filters, whatever the log. The
reference here keys that map by what the client sees in ``data:`` and decides
visibility with the independent policy of tests/test_policy.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Hashable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.events import Event, to_proto
from proxy.payloads import JSON_ENCODERS, Payload
from proxy.policy import Filters, Principal
from proxy.state import State, fold, select, terminal

from .test_policy import (
    SESSION_FIELDS,
    V4_FILTER_FIELDS,
    V5_FILTER_FIELDS,
    principals,
    reference_visible,
)

NAMES = [
    "session_enqueued",
    "session_started",
    "session_terminated",
    "kernel_started",
    "kernel_terminated",
    "kernel_cancelled",
    "x_new",
]


def client_key(name: str, data: dict[str, Any], payload: Payload) -> Hashable:
    """What a client can key its map by: the fields of ``data`` it gets."""
    if payload.generation is Payload.V4:
        return (data["ownerAccessKey"], data["sessionId"])
    kind = "kernel" if name.startswith("kernel_") else "session"
    return (data["ownerAccessKey"], data["sessionName"], data["sessionId"], kind,
            data.get("kernelId"))  # fmt: skip


def rendered(event: Event, payload: Payload) -> tuple[str, dict[str, Any]]:
    return event.name, json.loads(JSON_ENCODERS[payload](event))


def reference_map(
    log: Iterable[Event], principal: Principal, filters: Filters
) -> dict[Hashable, tuple[str, dict[str, Any]]]:
    """A client connected since the log began: every visible event, applied."""
    out: dict[Hashable, tuple[str, dict[str, Any]]] = {}
    for event in log:
        if reference_visible(principal, filters, event):
            name, data = rendered(event, filters.payload)
            out[client_key(name, data, filters.payload)] = (name, data)
    return out


def state_map(
    state: State[Event], principal: Principal, filters: Filters
) -> dict[Hashable, tuple[str, dict[str, Any]]]:
    """A client that applied the state's events, as a stream would write them."""
    chosen: dict[Any, Event] = {}
    table = state.events()
    for start in range(0, len(table), 7):  # in slices, as the writer does
        select(table[start : start + 7], principal, filters, chosen)
    out: dict[Hashable, tuple[str, dict[str, Any]]] = {}
    sequences = [e.sequence for e in chosen.values()]
    assert sequences == sorted(sequences), "state is written in log order"
    for event in chosen.values():
        name, data = rendered(event, filters.payload)
        out[client_key(name, data, filters.payload)] = (name, data)
    return out


def stream_filters() -> st.SearchStrategy[Filters]:
    """Filters as the two generations' parsers make them (with withGroup or without)."""
    v4 = st.builds(
        Filters, **V4_FILTER_FIELDS, payload=st.sampled_from([Payload.V4, Payload.V4_GROUP])
    )
    v5 = st.builds(
        Filters,
        **V5_FILTER_FIELDS,
        main_only=st.just(False),
        payload=st.sampled_from([Payload.V5, Payload.V5_GROUP]),
    )
    return v4 | v5


raw_events = st.builds(
    Event,
    sequence=st.just(0),
    name=st.sampled_from(NAMES),
    kernel_id=st.sampled_from(["", "k1", "k2", "k3"]),
    **SESSION_FIELDS,
    cluster_idx=st.integers(0, 2),
    exit_code=st.none() | st.integers(0, 2),
)
logs = st.lists(raw_events, max_size=80).map(
    lambda es: [dataclasses.replace(e, sequence=i + 1) for i, e in enumerate(es)]
)


def proxy_fold(events: Iterable[Event], **kw: Any) -> State[Event]:
    params: dict[str, Any] = {"retention": 1e9, "max_entities": 10**6, "clock": lambda: 0.0}
    return fold(events, stamp=lambda e: e.timestamp, **params | kw)


@settings(max_examples=300, deadline=None)
@given(logs, principals, stream_filters())
def test_state_equals_a_client_that_saw_the_whole_log(
    log: list[Event], principal: Principal, filters: Filters
) -> None:
    assert state_map(proxy_fold(log), principal, filters) == reference_map(log, principal, filters)


@settings(max_examples=200, deadline=None)
@given(logs, st.data(), principals, stream_filters())
def test_snapshot_then_changes_equals_the_whole_log(
    log: list[Event], data: st.DataObject, principal: Principal, filters: Filters
) -> None:
    cut = data.draw(st.integers(0, len(log)))
    snapshot = list(proxy_fold(log[:cut]).snapshot())
    resumed = proxy_fold(snapshot)
    for event in log[cut:]:
        resumed.apply(event)
    whole = proxy_fold(log)
    assert resumed.events() == whole.events()
    assert state_map(resumed, principal, filters) == reference_map(log, principal, filters)


@settings(max_examples=100, deadline=None)
@given(logs)
def test_the_upstream_fold_over_protobuf_holds_the_same_events(log: list[Event]) -> None:
    messages = [to_proto(e) for e in log]
    upstream = fold(messages, retention=1e9, max_entities=10**6, stamp=lambda m: 0.0)
    assert [m.sequence for m in upstream.snapshot()] == [
        e.sequence for e in proxy_fold(log).snapshot()
    ]


def _event(seq: int, name: str, session: str, ts: float, owner: str = "AK1") -> Event:
    return Event(seq, name, session, "", owner, "u1", "default", "g1", timestamp=ts)


def test_two_owners_same_named_sessions_are_two_entities() -> None:
    state = proxy_fold(
        [_event(1, "session_started", "s", 1), _event(2, "session_started", "s", 1, "AK2")]
    )
    assert len(state) == 2


def test_a_finished_session_is_forgotten_after_the_retention() -> None:
    now = [100.0]
    state = proxy_fold([], retention=10.0, clock=lambda: now[0])
    state.apply(_event(1, "session_started", "a", 100))
    state.apply(_event(2, "session_terminated", "a", 101))
    state.apply(_event(3, "session_started", "b", 101))
    assert len(state) == 2
    now[0] = 111.0
    assert [e.sequence for e in state.events()] == [3]
    assert state.expired == 1


def test_a_session_that_starts_again_is_not_forgotten_by_its_old_end() -> None:
    now = [0.0]
    state = proxy_fold([], retention=10.0, clock=lambda: now[0])
    state.apply(_event(1, "session_terminated", "a", 0))
    state.apply(_event(2, "session_started", "a", 5))
    now[0] = 50.0
    assert [e.sequence for e in state.events()] == [2]


def test_the_cap_forgets_the_least_recently_updated_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = proxy_fold([], max_entities=2)
    for seq, session in enumerate(["a", "b", "a", "c", "d"], start=1):
        state.apply(_event(seq, "session_started", session, 0))
    assert [e.session_id for e in state.events()] == ["c", "d"]
    assert state.evicted == 2
    warnings = [r for r in caplog.records if "max_entities" in r.getMessage()]
    assert len(warnings) == 1  # one clear line, not one per eviction


@pytest.mark.parametrize(
    ("name", "ends"),
    [("session_terminated", True), ("kernel_success", True), ("session_failure", True),
     ("kernel_cancelled", True), ("session_terminating", False), ("x_started", False)],
)  # fmt: skip
def test_terminal_names(name: str, ends: bool) -> None:
    assert terminal(name) is ends
