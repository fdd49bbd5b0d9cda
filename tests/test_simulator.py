"""The simulator: deterministic, in the original manager's lifecycle, spread over tenants.

``_Reference`` is an independent statement of the lifecycle the original's
``GET /events/session`` forwards (backendai-generations.md), checked event by event:
it knows nothing of how the simulator builds its scripts.
"""

from __future__ import annotations

import itertools
import random
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.events import from_proto
from proxy.simulator import DEFAULT_TENANTS, IMAGES, Simulator, Tenant

_TENANTS = {t.access_key: t for t in DEFAULT_TENANTS}
# registry[:port]/project/name:tag, the form of an image's canonical name.
_CANONICAL_IMAGE = re.compile(r"[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._-]+(/[a-z0-9._-]+)*:[\w.-]+")
_KERNEL_START = ("kernel_preparing", "kernel_pulling", "kernel_creating", "kernel_started")
_SESSION_FINAL = {"session_cancelled", "session_success", "session_failure"}
_INTERACTIVE_REASONS = {"user-requested", "idle-timeout", "force-terminated"}


def _events(seed: int, n: int, max_live_sessions: int = 20) -> list[pb.LifecycleEvent]:
    sim = Simulator(random.Random(seed), max_live_sessions=max_live_sessions)
    return [sim.next_event() for _ in range(n)]


def _is_uuid4(text: str) -> bool:
    return str(uuid.UUID(text)) == text and uuid.UUID(text).version == 4


def _has(e: pb.LifecycleEvent, name: str) -> bool:
    return e.HasField(name)  # type: ignore[arg-type]


@dataclass
class _KernelState:
    role: str
    idx: int
    stage: str = ""  # the last kernel_* event of this kernel
    exit_code: int | None = None  # what its kernel_terminating said
    result: int = pb.RESULT_UNSPECIFIED  # what its kernel_terminated said


@dataclass
class _SessionState:
    first: pb.LifecycleEvent
    phase: str = "new"
    kernels: dict[str, _KernelState] = field(default_factory=dict)
    reason: str | None = None  # the cancellation's or the termination's
    image: str | None = None
    names: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.phase == "done"


class _Reference:
    """Feeds on a stream of events; raises AssertionError at the first one out of place."""

    def __init__(self) -> None:
        self.sessions: dict[str, _SessionState] = {}
        self.uuids: dict[str, str] = {}  # session uuid -> session name
        self.kernel_owner: dict[str, str] = {}  # kernel id -> session name

    def open_sessions(self) -> int:
        return sum(not s.done for s in self.sessions.values())

    def feed(self, e: pb.LifecycleEvent) -> None:
        s = self.sessions.get(e.session_id)
        if s is None:
            assert e.name == "session_enqueued", (e.session_id, e.name)
            assert re.fullmatch(r"sess-[a-z]+-[0-9]+", e.session_id)
            assert _is_uuid4(e.session_uuid)
            assert e.session_uuid not in self.uuids, "a session UUID was reused"
            self.uuids[e.session_uuid] = e.session_id
            tenant = _TENANTS[e.owner_access_key]
            assert (e.user_id, e.domain_name) == (tenant.user_id, tenant.domain)
            assert e.group_name in tenant.groups
            s = self.sessions[e.session_id] = _SessionState(e)
        where = (e.session_id, [*s.names, e.name])
        assert not s.done, ("an event after the session ended", where)
        s.names.append(e.name)
        same = ("session_uuid", "owner_access_key", "user_id", "domain_name", "group_name")
        for attr in same:
            assert getattr(e, attr) == getattr(s.first, attr), (attr, where)
        assert e.sequence == 0
        assert not _has(e, "timestamp")
        if e.name.startswith("kernel_"):
            self._kernel_event(s, e, where)
        else:
            assert e.name.startswith("session_"), where
            assert (e.kernel_id, e.cluster_role, e.cluster_idx) == ("", "", 0), where
            self._session_event(s, e, where)

    def _kernel_event(self, s: _SessionState, e: pb.LifecycleEvent, where: object) -> None:
        assert _is_uuid4(e.kernel_id), where
        k = s.kernels.get(e.kernel_id)
        if k is None:
            assert s.phase in {"enqueued", "scheduled", "cancelling"}, ("a late kernel", where)
            assert self.kernel_owner.setdefault(e.kernel_id, e.session_id) == e.session_id
            assert e.cluster_role in {"main", "sub"}, where
            assert e.cluster_idx >= 1, where
            taken = {(o.role, o.idx) for o in s.kernels.values()}
            assert (e.cluster_role, e.cluster_idx) not in taken, ("role and index twice", where)
            k = s.kernels[e.kernel_id] = _KernelState(e.cluster_role, e.cluster_idx)
        assert (e.cluster_role, e.cluster_idx) == (k.role, k.idx), where
        if e.name == "kernel_cancelled":
            assert s.phase in {"enqueued", "scheduled", "cancelling"}, where
            assert k.stage in {"", *_KERNEL_START[:3]}, ("a started kernel cancelled", where)
            assert e.reason, where
            assert s.reason in {None, e.reason}, where
            assert not _has(e, "exit_code"), where
            s.reason = e.reason
            s.phase = "cancelling"
        elif e.name in _KERNEL_START:
            assert s.phase == "scheduled", where
            allowed = {
                "kernel_preparing": {""},
                "kernel_pulling": {"kernel_preparing"},
                "kernel_creating": {"kernel_preparing", "kernel_pulling"},
                "kernel_started": {"kernel_creating"},
            }[e.name]
            assert k.stage in allowed, where
            if e.name == "kernel_pulling":
                assert _CANONICAL_IMAGE.fullmatch(e.reason), where
                assert s.image in {None, e.reason}, ("kernels of one session, two images", where)
                s.image = e.reason
            assert not _has(e, "exit_code"), where
        elif e.name == "kernel_terminating":
            assert s.phase == "terminating", where
            assert k.stage == "kernel_started", where
            assert e.reason == s.reason, where
            k.exit_code = e.exit_code if _has(e, "exit_code") else None
        elif e.name == "kernel_terminated":
            assert s.phase == "terminating", where
            assert k.stage == "kernel_terminating", where
            assert e.reason == s.reason, where
            self._check_kernel_outcome(k, e, where)
            k.result = e.result
        else:
            raise AssertionError(("not a kernel event of the original's", where))
        k.stage = e.name

    @staticmethod
    def _check_kernel_outcome(k: _KernelState, e: pb.LifecycleEvent, where: object) -> None:
        if k.exit_code is not None:  # a batch task that has exited: its code decides
            assert e.exit_code == k.exit_code, where
            assert e.result == (pb.RESULT_SUCCESS if k.exit_code == 0 else pb.RESULT_FAILURE)
            assert e.reason == "self-terminated", where
        elif e.reason == "force-terminated":
            assert (e.result, e.exit_code) == (pb.RESULT_FAILURE, 137), where
        else:
            assert e.reason in _INTERACTIVE_REASONS, where
            assert e.result == pb.RESULT_UNDEFINED, where
            assert not _has(e, "exit_code"), where

    def _session_event(self, s: _SessionState, e: pb.LifecycleEvent, where: object) -> None:
        kernels = list(s.kernels.values())
        if e.name not in {"session_success", "session_failure"}:
            assert not _has(e, "exit_code"), where
        if e.name == "session_enqueued":
            assert s.phase == "new", where
            s.phase = "enqueued"
        elif e.name == "session_scheduled":
            assert s.phase == "enqueued", where
            s.phase = "scheduled"
        elif e.name == "session_cancelled":
            assert s.phase == "cancelling", where
            assert e.reason == s.reason, where
            assert all(k.stage == "kernel_cancelled" for k in kernels), where
            self._check_cluster(kernels, where)
            s.phase = "done"
        elif e.name == "session_started":
            assert s.phase == "scheduled", where
            assert kernels, where
            assert all(k.stage == "kernel_started" for k in kernels), where
            self._check_cluster(kernels, where)
            s.phase = "running"
        elif e.name == "session_terminating":
            assert s.phase == "running", where
            assert e.reason, where
            s.reason = e.reason
            s.phase = "terminating"
        elif e.name == "session_terminated":
            assert s.phase == "terminating", where
            assert e.reason == s.reason, where
            assert all(k.stage == "kernel_terminated" for k in kernels), where
            assert {k.result for k in kernels} == {e.result}, where
            codes = {k.exit_code for k in kernels}
            assert len(codes) == 1, where
            # A batch session says how its task ended; an interactive one is over.
            s.phase = "done" if codes == {None} else "awaiting_result"
        elif e.name in {"session_success", "session_failure"}:
            assert s.phase == "awaiting_result", where
            (code,) = {k.exit_code for k in kernels}
            assert _has(e, "exit_code"), where
            assert e.exit_code == code, where
            success = e.name == "session_success"
            assert (code == 0) is success, where
            assert e.result == (pb.RESULT_SUCCESS if success else pb.RESULT_FAILURE), where
            assert e.reason, where
            s.phase = "done"
        else:
            raise AssertionError(("not a session event of the original's", where))

    @staticmethod
    def _check_cluster(kernels: list[_KernelState], where: object) -> None:
        # Exactly one main kernel, main1; subs are sub1..subN, as the original names them.
        assert [k.idx for k in kernels if k.role == "main"] == [1], where
        subs = sorted(k.idx for k in kernels if k.role == "sub")
        assert subs == list(range(1, len(subs) + 1)), where
        assert len(subs) <= 3, where


def _check(seed: int, n: int, max_live: int = 20) -> _Reference:
    """n events checked, then more until every session begun in them has ended."""
    sim = Simulator(random.Random(seed), max_live_sessions=max_live)
    ref = _Reference()
    for _ in range(n):
        ref.feed(sim.next_event())
        assert ref.open_sessions() <= max_live
    begun = list(ref.sessions.values())
    for _ in range(200 * max_live):
        if all(s.done for s in begun):
            break
        ref.feed(sim.next_event())
    assert all(s.done for s in begun)
    return ref


def test_same_seed_same_events() -> None:
    a = [e.SerializeToString() for e in _events(7, 500)]
    b = [e.SerializeToString() for e in _events(7, 500)]
    c = [e.SerializeToString() for e in _events(8, 500)]
    assert a == b
    assert a != c


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), max_live=st.integers(1, 30))
def test_lifecycle_any_seed(seed: int, max_live: int) -> None:
    _check(seed, 400, max_live)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_one_live_session_at_a_time_gives_whole_sessions_in_turn(seed: int) -> None:
    events = _events(seed, 300, max_live_sessions=1)
    ref = _Reference()
    for e in events:
        ref.feed(e)
        assert ref.open_sessions() <= 1
    runs = [name for name, _ in itertools.groupby(e.session_id for e in events)]
    assert len(runs) == len(set(runs))  # each session's events in one run


def test_the_reference_refuses_what_the_original_never_sends() -> None:
    stream = _events(5, 300, max_live_sessions=1)
    name = next(e.session_id for e in stream if e.name == "session_success")
    events = [e for e in stream if e.session_id == name]
    assert [e.name for e in events[:2]] == ["session_enqueued", "session_scheduled"]

    def refused(stream: list[pb.LifecycleEvent]) -> bool:
        ref = _Reference()
        try:
            for e in stream:
                ref.feed(e)
        except AssertionError:
            return True
        return False

    assert not refused(events)
    assert refused(events[1:])  # no session_enqueued
    assert refused([events[0], *events[2:]])  # no session_scheduled
    assert refused([*events, events[-1]])  # after the end
    assert refused(events[:-2] + events[-1:])  # the result before session_terminated
    started = next(i for i, e in enumerate(events) if e.name == "session_started")
    assert refused(events[: started - 1] + events[started:])  # a kernel never started
    kernel_event = next(e for e in events if e.name == "kernel_started")
    wrong_role = pb.LifecycleEvent()
    wrong_role.CopyFrom(kernel_event)
    wrong_role.cluster_role = "sub"
    assert refused([wrong_role if e is kernel_event else e for e in events])


def test_sessions_and_kernels() -> None:
    ref = _check(5, 3000)
    sessions = list(ref.sessions.values())
    assert len(ref.kernel_owner) == sum(len(s.kernels) for s in sessions)
    clusters = [s for s in sessions if len(s.kernels) > 1]
    assert 0.1 < len(clusters) / len(sessions) < 0.3
    assert {len(s.kernels) for s in clusters} == {2, 3, 4}
    pulled = {s.image for s in sessions if s.image}
    assert pulled <= set(IMAGES)
    assert len(pulled) >= 3


def test_kernel_events_of_a_cluster_name_their_kernel() -> None:
    events = _events(2024, 3000)
    by_kernel: dict[str, set[tuple[str, int]]] = {}
    for e in events:
        if e.name.startswith("kernel_"):
            by_kernel.setdefault(e.kernel_id, set()).add((e.cluster_role, e.cluster_idx))
    assert all(len(roles) == 1 for roles in by_kernel.values())
    seen = {role for roles in by_kernel.values() for role in roles}
    assert {("main", 1), ("sub", 1), ("sub", 2), ("sub", 3)} <= seen


def test_variety_in_3000_events() -> None:
    events = _events(2024, 3000)
    assert len({e.user_id for e in events}) >= 4
    assert {e.domain_name for e in events} == {"default", "research"}
    assert len({e.group_name for e in events}) >= 4
    names = Counter(e.name for e in events)
    assert set(names) == {
        "session_enqueued", "session_scheduled", "kernel_preparing", "kernel_pulling",
        "kernel_creating", "kernel_started", "session_started", "session_terminating",
        "kernel_terminating", "kernel_terminated", "session_terminated", "session_success",
        "session_failure", "kernel_cancelled", "session_cancelled",
    }  # fmt: skip
    results = Counter(e.result for e in events if e.name == "kernel_terminated")
    assert results[pb.RESULT_SUCCESS] > 0
    assert results[pb.RESULT_FAILURE] > 0
    assert results[pb.RESULT_UNDEFINED] > 0
    reasons = {e.reason for e in events if _has(e, "reason")}
    assert {"failed-to-start", "idle-timeout", "user-requested", "self-terminated"} <= reasons
    cancels = {e.reason for e in events if e.name == "session_cancelled"}
    assert len(cancels) >= 2  # while still queued, and a start that failed


def test_events_are_forwardable_once_sequenced() -> None:
    for seq, e in enumerate(_events(9, 500), start=1):
        e.sequence = seq
        event = from_proto(e)
        assert (event.session_id, event.session_uuid) == (e.session_id, e.session_uuid)
        assert (event.kernel_id, event.cluster_role, event.cluster_idx) == (
            e.kernel_id,
            e.cluster_role,
            e.cluster_idx,
        )


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
