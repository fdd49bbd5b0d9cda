"""A group's plumbing without processes: the link's framing and requests, a worker's
questions answered by a ledger, the group's metrics, how many cores ``auto`` means."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import RequestError
from proxy.group import Frames, Link, LinkClosed, Message, WorkerGroup, encode, ledger_for
from proxy.limits import Ledger, StreamLimitExceeded
from proxy.metrics import group_view
from proxy.supervisor import cores_allowed

from .test_limits import ledger
from .test_metrics import counter, gauge, values

# --- Frames -------------------------------------------------------------------------------


@given(
    st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3)),
    st.integers(1, 17),
)
def test_messages_come_out_whole_however_the_bytes_are_cut(
    messages: list[dict[str, str]], cut: int
) -> None:
    data = b"".join(encode(m) for m in messages)
    frames = Frames()
    got: list[Message] = []
    for start in range(0, len(data), cut):
        got += frames.feed(data[start : start + cut])
    assert got == messages


def test_a_message_that_never_ends_is_refused() -> None:
    frames = Frames(limit=64)
    with pytest.raises(ValueError, match="longer than 64"):
        frames.feed(b"x" * 65)


# --- Link -----------------------------------------------------------------------------------


@asynccontextmanager
async def linked(
    handle_a: Any = None, handle_b: Any = None
) -> AsyncIterator[tuple[Link, Link, trio.Nursery]]:
    left, right = trio.testing.memory_stream_pair()
    a, b = Link(left), Link(right)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run, handle_a or (lambda m: None))
        nursery.start_soon(b.run, handle_b or (lambda m: None))
        yield a, b, nursery
        nursery.cancel_scope.cancel()


async def test_requests_are_answered_both_ways_and_posts_need_no_answer() -> None:
    posted: list[Message] = []

    def server(message: Message) -> Message | None:
        if message["op"] == "double":
            return {"value": message["value"] * 2}
        posted.append(message)
        return None

    async with linked(lambda m: {"pong": True}, server) as (a, b, _):
        assert (await a.request({"op": "double", "value": 21}))["value"] == 42
        a.post({"op": "note", "n": 1})
        assert (await b.request({"op": "ping"}))["pong"] is True
        assert posted == [{"op": "note", "n": 1}]


async def test_an_answer_after_the_asker_gave_up_goes_to_late() -> None:
    """A slot granted to a request that was cancelled meanwhile must be given back."""
    release = trio.Event()
    late: list[Message] = []
    left, right = trio.testing.memory_stream_pair()
    a, b = Link(left), Link(right)
    async with trio.open_nursery() as nursery:

        def slow(message: Message) -> None:
            async def answer() -> None:
                await release.wait()
                b.reply(message, {"granted": True})

            nursery.start_soon(answer)

        nursery.start_soon(a.run, lambda m: None)
        nursery.start_soon(b.run, slow)
        with trio.move_on_after(0.05) as gave_up:
            await a.request({"op": "acquire"}, late=late.append)
        release.set()
        with trio.fail_after(5):
            while not late:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert gave_up.cancelled_caught
    assert late[0]["granted"] is True


async def test_a_closed_link_fails_waiting_and_new_requests() -> None:
    left, right = trio.testing.memory_stream_pair()
    a = Link(left)
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run, lambda m: None)

        async def ask() -> None:
            try:
                await a.request({"op": "never-answered"})
            except LinkClosed:
                failures.append("waiting")

        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        await right.aclose()  # the other end goes away
    assert failures == ["waiting"]
    with pytest.raises(LinkClosed):
        await a.request({"op": "after"})
    a.post({"op": "dropped"})  # no error: nobody to tell


# --- A worker's questions, answered as the supervisor does --------------------------------


@asynccontextmanager
async def worker_of(accounts: Ledger) -> AsyncIterator[WorkerGroup]:
    def supervisor(message: Message) -> Message | None:
        op = message["op"]
        if op == "acquire":
            try:
                accounts.acquire(message["key"], holder=1)
            except StreamLimitExceeded as exc:
                return {"refused": {"status": exc.status, "error": exc.error, "detail": "x"}}
            return {"ok": True}
        if op == "release":
            accounts.release(message["key"], holder=1)
        if op == "login_attempt":
            return {"wait": accounts.login_attempt(message["address"])}
        return None

    async with linked(None, supervisor) as (a, _, _nursery):
        yield WorkerGroup(a, index=1, workers=2, listen=[], metrics_listen=[])


async def test_a_worker_takes_and_gives_back_the_groups_slots() -> None:
    accounts = ledger(per_key=1, total=5)
    async with worker_of(accounts) as group:
        await group.acquire_stream("AK1")
        with pytest.raises(StreamLimitExceeded) as info:
            await group.acquire_stream("AK1")
        assert (info.value.status, info.value.error) == (429, "too-many-streams")
        group.release_stream("AK1")
        await trio.testing.wait_all_tasks_blocked()
        assert accounts.slots.held == 0
        assert await group.login_attempt("10.0.0.1") == 0.0


async def test_without_its_supervisor_a_worker_answers_503() -> None:
    left, right = trio.testing.memory_stream_pair()
    link = Link(left)
    group = WorkerGroup(link, index=1, workers=2, listen=[], metrics_listen=[])
    await right.aclose()
    await link.run(lambda m: None)  # returns: the other end is gone
    with pytest.raises(RequestError) as info:
        await group.health()
    assert (info.value.status, info.value.error) == (503, "supervisor-unavailable")
    with pytest.raises(RequestError) as refused:
        await group.acquire_stream("AK1")
    assert refused.value.status == 503


def test_ledger_for_takes_every_limit_from_the_settings() -> None:
    from proxy.config import LimitsSettings

    accounts = ledger_for(LimitsSettings(max_streams_per_key=1, login_attempts_per_address=1))
    accounts.acquire("AK1")
    with pytest.raises(StreamLimitExceeded):
        accounts.acquire("AK1")
    assert accounts.login_attempt("a") == 0.0
    assert accounts.login_attempt("a") > 0


# --- The group's metrics --------------------------------------------------------------------


def test_per_upstream_event_counters_are_per_worker_the_rest_summed() -> None:
    worker = [
        counter("kep_events_published", 100),
        counter("kep_events_delivered", 300),
        gauge("kep_upstream_live", 1),
    ]
    view = values(group_view([], [worker, worker], 2, 2, 1))
    assert view[("kep_events_published_total", ())] == 100  # each event once per worker
    assert view[("kep_events_delivered_total", ())] == 600  # every client's frames
    assert view[("kep_upstream_live", ())] == 1
    assert view[("kep_workers", (("state", "configured"),))] == 2
    assert view[("kep_workers", (("state", "running"),))] == 2
    assert view[("kep_worker_restarts_total", ())] == 1


# --- server.workers = "auto" -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "cpu_max", "expected"),
    [
        (8, None, 8),
        (8, "max 100000\n", 8),
        (8, "200000 100000\n", 2),
        (8, "150000 100000", 2),
        (8, "50000 100000", 1),
        (2, "800000 100000", 2),
        (4, "garbage", 4),
        (0, None, 1),
    ],
)
def test_auto_is_the_cores_this_process_may_use(
    cores: int, cpu_max: str | None, expected: int
) -> None:
    assert cores_allowed(cores, cpu_max) == expected
