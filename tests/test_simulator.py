"""The simulator: deterministic, lifecycle-ordered, spread over tenants."""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.events import from_proto
from proxy.simulator import DEFAULT_TENANTS, Simulator, Tenant

# Rank of each event in a session's life; a session's ranks must strictly increase.
_RANK = {
    "kernel_enqueued": 0,
    "kernel_preparing": 1,
    "kernel_pulling": 2,
    "kernel_creating": 3,
    "kernel_started": 4,
    "kernel_terminating": 5,
    "kernel_terminated": 6,
    "kernel_cancelled": 6,
}
_FINAL = {"kernel_terminated", "kernel_cancelled"}


def _events(seed: int, n: int, max_live_sessions: int = 20) -> list[pb.LifecycleEvent]:
    sim = Simulator(random.Random(seed), max_live_sessions=max_live_sessions)
    return [sim.next_event() for _ in range(n)]


def _by_session(events: list[pb.LifecycleEvent]) -> dict[str, list[pb.LifecycleEvent]]:
    sessions: dict[str, list[pb.LifecycleEvent]] = defaultdict(list)
    for e in events:
        sessions[e.session_id].append(e)
    return sessions


def _check_lifecycle(events: list[pb.LifecycleEvent]) -> None:
    tenants = {t.access_key: t for t in DEFAULT_TENANTS}
    for session_id, evs in _by_session(events).items():
        ranks = [_RANK[e.name] for e in evs]
        assert ranks == sorted(set(ranks)), (session_id, [e.name for e in evs])
        assert evs[0].name in {"kernel_enqueued", "kernel_preparing"}
        assert all(e.name not in _FINAL for e in evs[:-1])
        if evs[-1].name == "kernel_cancelled":
            assert [e.name for e in evs] == ["kernel_enqueued", "kernel_cancelled"]
        first = evs[0]
        tenant = tenants[first.owner_access_key]
        assert (first.user_id, first.domain_name) == (tenant.user_id, tenant.domain)
        assert first.group_name in tenant.groups
        for e in evs:
            assert (e.kernel_id, e.owner_access_key, e.group_name) == (
                first.kernel_id,
                first.owner_access_key,
                first.group_name,
            )


def test_same_seed_same_events() -> None:
    a = [e.SerializeToString() for e in _events(7, 500)]
    b = [e.SerializeToString() for e in _events(7, 500)]
    c = [e.SerializeToString() for e in _events(8, 500)]
    assert a == b
    assert a != c


def test_events_leave_sequence_and_timestamp_to_the_caller() -> None:
    for e in _events(1, 300):
        assert e.sequence == 0
        assert not e.HasField("timestamp")


def test_lifecycle_order_2000_events() -> None:
    _check_lifecycle(_events(42, 2000))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), max_live=st.integers(1, 30))
def test_lifecycle_order_any_seed(seed: int, max_live: int) -> None:
    _check_lifecycle(_events(seed, 400, max_live_sessions=max_live))


def test_live_sessions_never_exceed_cap() -> None:
    live: set[str] = set()
    for e in _events(3, 2000, max_live_sessions=5):
        live.add(e.session_id)
        assert len(live) <= 5
        if e.name in _FINAL:
            live.remove(e.session_id)


def test_ids_and_names() -> None:
    events = _events(5, 2000)
    kernel_by_session = {e.session_id: e.kernel_id for e in events}
    assert len(set(kernel_by_session.values())) == len(kernel_by_session)
    for session_id, kernel_id in kernel_by_session.items():
        assert re.fullmatch(r"sess-[a-z]+-[0-9]+", session_id)
        assert uuid.UUID(kernel_id).version == 4


def test_terminated_events_carry_a_result() -> None:
    terminated = [e for e in _events(11, 2000) if e.name == "kernel_terminated"]
    assert terminated
    for e in terminated:
        assert e.HasField("reason")
        assert e.result != pb.RESULT_UNSPECIFIED
        if e.result == pb.RESULT_SUCCESS:
            assert e.HasField("exit_code")
            assert e.exit_code == 0
        elif e.result == pb.RESULT_FAILURE:
            assert e.HasField("exit_code")
            assert e.exit_code != 0
        else:
            assert not e.HasField("exit_code")


def test_variety_in_2000_events() -> None:
    events = _events(2024, 2000)
    assert len({e.user_id for e in events}) >= 4
    assert {e.domain_name for e in events} == {"default", "research"}
    assert len({e.group_name for e in events}) >= 4
    names = Counter(e.name for e in events)
    assert names["kernel_cancelled"] > 0
    assert names["kernel_pulling"] > 0
    results = Counter(e.result for e in events if e.name == "kernel_terminated")
    assert results[pb.RESULT_SUCCESS] > 0
    assert results[pb.RESULT_FAILURE] > 0
    assert results[pb.RESULT_UNDEFINED] > 0
    reasons = {e.reason for e in events if e.HasField("reason")}
    assert {"failed-to-start", "idle-timeout", "user-requested", "self-terminated"} <= reasons


def test_events_are_forwardable_once_sequenced() -> None:
    for seq, e in enumerate(_events(9, 500), start=1):
        e.sequence = seq
        assert from_proto(e).session_id == e.session_id


def test_demo_tenants() -> None:
    by_key = {t.access_key: t for t in DEFAULT_TENANTS}
    assert by_key["AKDEMOUSER1"] == Tenant(
        "demo-user-1", "AKDEMOUSER1", "default", ("g-alpha", "g-beta")
    )
    for key, user in [
        ("AKDEMOUSER2", "demo-user-2"),
        ("AKDEMOADMIN1", "demo-admin-1"),
        ("AKDEMOSUPER1", "demo-super-1"),
    ]:
        assert (by_key[key].user_id, by_key[key].domain) == (user, "default")
    assert by_key["AKRESUSER1"].domain == "research"
    assert len({t.user_id for t in DEFAULT_TENANTS}) == len(DEFAULT_TENANTS)


def test_custom_tenants_only() -> None:
    solo = Tenant("u", "AK", "d", ("g",))
    sim = Simulator(random.Random(0), tenants=[solo], max_live_sessions=2)
    for _ in range(50):
        e = sim.next_event()
        assert (e.user_id, e.owner_access_key, e.domain_name, e.group_name) == ("u", "AK", "d", "g")


@pytest.mark.parametrize(
    ("tenants", "max_live"),
    [((), 5), ((Tenant("u", "AK", "d", ()),), 5), (DEFAULT_TENANTS, 0)],
)
def test_rejects_bad_configuration(tenants: tuple[Tenant, ...], max_live: int) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        Simulator(random.Random(0), tenants, max_live)
