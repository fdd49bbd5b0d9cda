"""The hub: index, fan-out, bounded outboxes, history replay, gaps and shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import proxy.hub as hub_module
from proxy import policy
from proxy.eventid import Cursor
from proxy.events import Event
from proxy.hub import Hub, Outbox, encode
from proxy.payloads import Payload
from proxy.policy import Filters, Principal, Role

from .test_policy import events, filters, principals, reference_visible

SUPER = Principal("AKS", Role.SUPERADMIN, "s", "default")
USER = Principal("AK1", Role.USER, "u1", "default")


def ev(seq: int, session: str = "s1", user: str = "u1", owner: str = "AK1") -> Event:
    return Event(seq, "kernel_started", session, "", owner, user, "default", "g1")


def frames_of(outbox: Outbox) -> list[bytes]:
    taken = outbox._frames[:]
    return taken


def ids(outbox: Outbox) -> list[str]:
    out = []
    for frame in outbox._frames:
        for line in frame.decode().split("\n"):
            if line.startswith("id: "):
                out.append(line[4:])
    return out


def event_names(outbox: Outbox) -> list[str]:
    return [
        line[7:]
        for frame in outbox._frames
        for line in frame.decode().split("\n")
        if line.startswith("event: ")
    ]


@settings(max_examples=200)
@given(
    st.lists(st.tuples(principals, filters), min_size=1, max_size=12),
    st.lists(events, max_size=40),
)
def test_fan_out_delivers_exactly_what_the_policy_allows(
    subs: list[tuple[Principal, Filters]], evs: list[Event]
) -> None:
    hub = Hub(history_size=0, outbox_limit=10_000)
    numbered = [dataclasses.replace(e, sequence=i + 1) for i, e in enumerate(evs)]
    with contextlib.ExitStack() as stack:
        subscriptions = [stack.enter_context(hub.subscribe(p, f)) for p, f in subs]
        hub.publish("log", numbered)
        for (p, f), sub in zip(subs, subscriptions, strict=True):
            # Each in its own generation's shape (payloads.py), byte for byte.
            expected = [encode("log", e, f.payload) for e in numbered if reference_visible(p, f, e)]
            assert frames_of(sub.outbox) == expected


def test_frame_is_encoded_once_and_shared() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    with hub.subscribe(SUPER, Filters()) as a, hub.subscribe(USER, Filters()) as b:
        hub.publish("L", [ev(1)])
        assert a.outbox._frames[0] is b.outbox._frames[0]


def test_each_generation_encodes_an_event_once_for_all_its_clients() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    v5 = Filters(main_only=False, payload=Payload.V5)
    with contextlib.ExitStack() as stack:
        old = [stack.enter_context(hub.subscribe(p, Filters())) for p in (SUPER, USER)]
        new = [stack.enter_context(hub.subscribe(p, v5)) for p in (SUPER, USER)]
        hub.publish("L", [ev(1)])
        assert old[0].outbox._frames[0] is old[1].outbox._frames[0]
        assert new[0].outbox._frames[0] is new[1].outbox._frames[0]
        assert new[0].outbox._frames[0] == encode("L", ev(1), Payload.V5)
        # A v5 client resuming from the history gets v5 frames too.
        with hub.subscribe(USER, v5, after=Cursor("L", 0)) as late:
            assert frames_of(late.outbox) == [encode("L", ev(1), Payload.V5)]


def test_subscription_released_on_exit() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    with hub.subscribe(USER, Filters(session="s1", owner="AK1")):
        assert hub.clients == 1
    assert hub.clients == 0
    assert all(buckets == {} for buckets in hub._index.values())


@given(events)
def test_the_hub_looks_events_up_under_exactly_policy_event_keys(event: Event) -> None:
    # The proof that the index never hides an event is about policy.event_keys; the hub
    # reads the same keys straight from the event's fields.
    keys = tuple((kind, field(event)) for kind, field in hub_module._EVENT_FIELDS)
    assert keys == policy.event_keys(event)
    assert set(Hub(history_size=0, outbox_limit=1)._index) == {k for k, _ in keys}


def test_slow_client_is_dropped_with_a_reason_others_unaffected() -> None:
    hub = Hub(history_size=0, outbox_limit=3)
    with hub.subscribe(SUPER, Filters()) as slow, hub.subscribe(SUPER, Filters()) as fast:
        for seq in range(1, 6):
            hub.publish("L", [ev(seq)])
            fast.outbox._frames.clear()  # a reader keeping up
        assert slow.outbox.closed
        assert slow.outbox.reason == "overflow"
        assert ids(slow.outbox) == ["L:1", "L:2", "L:3"]
        assert event_names(slow.outbox)[-1] == "stream_overflow"
        assert not fast.outbox.closed


def test_resume_from_history_replays_only_visible_events_after_cursor() -> None:
    hub = Hub(history_size=100, outbox_limit=10)
    hub.publish("L", [ev(1), ev(2, user="u2", owner="AK2"), ev(3), ev(4)])
    with hub.subscribe(USER, Filters(), after=Cursor("L", 1)) as sub:
        assert ids(sub.outbox) == ["L:3", "L:4"]
        hub.publish("L", [ev(5)])
        assert ids(sub.outbox) == ["L:3", "L:4", "L:5"]


def test_resume_older_than_history_asks_for_a_catch_up_first() -> None:
    hub = Hub(history_size=2, outbox_limit=10)
    hub.publish("L", [ev(1), ev(2), ev(3), ev(4)])
    with hub.subscribe(SUPER, Filters(), after=Cursor("L", 1)) as sub:
        # Events 2..2 must come from the upstream, before the retained 3 and 4.
        assert sub.catchup == (Cursor("L", 1), 2)
        assert ids(sub.outbox) == ["L:3", "L:4"]


def test_resume_from_an_unknown_log_sends_a_gap_then_history() -> None:
    hub = Hub(history_size=2, outbox_limit=10)
    hub.publish("L", [ev(1), ev(2), ev(3)])
    with hub.subscribe(SUPER, Filters(), after=Cursor("OLD", 7)) as sub:
        assert sub.catchup is None
        assert event_names(sub.outbox) == ["stream_gap", "kernel_started", "kernel_started"]
        gap = json.loads(sub.outbox._frames[0].decode().split("data: ")[1])
        assert gap == {"reason": "history-exhausted", "after": "OLD:7", "before": "L:2"}


def test_resume_in_current_log_without_history_catches_up_to_the_head() -> None:
    hub = Hub(history_size=0, outbox_limit=10)
    hub.publish("L", [ev(1), ev(2), ev(3)])
    with hub.subscribe(SUPER, Filters(), after=Cursor("L", 1)) as sub:
        assert sub.catchup == (Cursor("L", 1), 3)
        assert ids(sub.outbox) == []


def test_resume_just_before_oldest_retained_is_not_a_gap() -> None:
    hub = Hub(history_size=2, outbox_limit=10)
    hub.publish("L", [ev(1), ev(2), ev(3), ev(4)])
    with hub.subscribe(SUPER, Filters(), after=Cursor("L", 2)) as sub:
        assert event_names(sub.outbox) == ["kernel_started", "kernel_started"]


def test_resume_ahead_of_this_proxy_skips_what_the_client_has() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    hub.publish("L", [ev(1), ev(2)])
    with hub.subscribe(SUPER, Filters(), after=Cursor("L", 4)) as sub:
        assert ids(sub.outbox) == []
        hub.publish("L", [ev(3), ev(4), ev(5)])
        assert ids(sub.outbox) == ["L:5"]


def test_a_storm_of_level_clients_leaving_before_the_next_event_is_forgotten() -> None:
    """Clients resuming level with this proxy wait for the next publish; those that
    leave first are dropped from the waiting set (in any order), the rest settle."""
    hub = Hub(history_size=10, outbox_limit=10)
    hub.publish("L", [ev(1), ev(2)])
    with contextlib.ExitStack() as stack:
        leaving = [contextlib.ExitStack() for _ in range(50)]
        for exits in leaving:
            exits.enter_context(hub.subscribe(SUPER, Filters(), after=Cursor("L", 2)))
        staying = [
            stack.enter_context(hub.subscribe(SUPER, Filters(), after=Cursor("L", 2)))
            for _ in range(3)
        ]
        for exits in reversed(leaving):
            exits.close()
        assert len(hub._pending) == 3
        hub.publish("L", [ev(3)])
        assert not hub._pending
        assert [ids(sub.outbox) for sub in staying] == [["L:3"]] * 3


def test_resume_before_first_publish_catches_up_what_this_proxy_never_saw() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    with hub.subscribe(SUPER, Filters(), after=Cursor("L", 4)) as sub:
        hub.publish("L", [ev(9)])
        assert sub.catchup == (Cursor("L", 4), 8)
        assert ids(sub.outbox) == ["L:9"]


def test_resume_before_first_publish_from_another_log_is_a_gap() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    with hub.subscribe(SUPER, Filters(), after=Cursor("OLD", 4)) as sub:
        hub.publish("L", [ev(1)])
        assert sub.catchup is None
        assert event_names(sub.outbox) == ["stream_gap", "kernel_started"]


def test_resume_before_first_publish_without_gap() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    with hub.subscribe(SUPER, Filters(), after=Cursor("L", 4)) as sub:
        hub.publish("L", [ev(4), ev(5)])
        assert ids(sub.outbox) == ["L:5"]


def test_gap_notice_goes_to_everyone_and_into_history() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    hub.publish("L", [ev(1)])
    with hub.subscribe(USER, Filters(session="other", owner="AK1")) as sub:
        hub.publish_gap("upstream-gap", "L:1", "L:5")
        assert event_names(sub.outbox) == ["stream_gap"]
    hub.publish("L", [ev(5)])
    with hub.subscribe(SUPER, Filters(), after=Cursor("L", 1)) as late:
        assert event_names(late.outbox) == ["stream_gap", "kernel_started"]


def test_close_sends_server_close_after_queued_frames() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    with hub.subscribe(SUPER, Filters()) as sub:
        hub.publish("L", [ev(1)])
        hub.close()
        assert event_names(sub.outbox) == ["kernel_started", "server_close"]
        assert sub.outbox.closed
    with hub.subscribe(SUPER, Filters()) as late:
        assert event_names(late.outbox) == ["server_close"]


async def test_outbox_take_waits_and_coalesces() -> None:
    box = Outbox(limit=10)
    got: list[list[bytes]] = []

    async def reader() -> None:
        got.append(await box.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        box.put(b"a")
        box.put(b"b")
    assert got == [[b"a", b"b"]]


@pytest.fixture
def visible_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the hub's calls of ``policy.visible`` (``calls[0]``)."""
    calls = [0]
    real = policy.visible

    def counting(p: Principal, f: Filters, e: Event) -> bool:
        calls[0] += 1
        return real(p, f, e)

    monkeypatch.setattr(hub_module, "visible", counting)
    return calls


def test_publish_cost_follows_matching_clients(visible_calls: list[int]) -> None:
    # 2,000 non-matching users must not be visited for an event that is not theirs.
    hub = Hub(history_size=0, outbox_limit=10)
    with contextlib.ExitStack() as stack:
        for i in range(2000):
            stack.enter_context(
                hub.subscribe(Principal(f"AK{i}", Role.USER, f"user{i}", "d"), Filters())
            )
        target = random.Random(1).randrange(2000)
        hub.publish("L", [ev(1, user=f"user{target}", owner=f"AK{target}")])
    assert visible_calls[0] == 1


def test_visible_is_decided_once_per_audience(visible_calls: list[int]) -> None:
    hub = Hub(history_size=0, outbox_limit=10)
    admin = Principal("AKA", Role.ADMIN, "a", "default")
    with contextlib.ExitStack() as stack:
        subs = [stack.enter_context(hub.subscribe(SUPER, Filters())) for _ in range(500)]
        admins = [stack.enter_context(hub.subscribe(admin, Filters())) for _ in range(500)]
        hub.publish("L", [ev(1)])
        assert visible_calls[0] == 2  # one per audience, not one per subscriber
        assert all(len(s.outbox) == 1 for s in subs + admins)


def test_attach_gives_a_position_before_any_event_and_resume_catches_up() -> None:
    hub = Hub(history_size=10, outbox_limit=10)
    assert hub.position() is None
    hub.attach("L", 7)
    hub.attach("M", 99)  # only the first attachment counts
    assert hub.position() == "L:7"
    with hub.subscribe(SUPER, Filters(), after=Cursor("L", 3)) as sub:
        assert sub.catchup == (Cursor("L", 3), 7)
    with hub.subscribe(SUPER, Filters()) as fresh:
        assert hub.settled(fresh)
        hub.publish("L", [ev(8)])
        assert not hub.settled(fresh)
        assert hub.position() == "L:8"
