"""Resume with Last-Event-ID: from the proxy's history, from the upstream, across restarts."""

from __future__ import annotations

import pytest
import trio

from proxy.generations import GENERATIONS, Generation
from proxy.upstream_server import EventLog, UpstreamServer

from ..conftest import ProxyUnderTest, started_proxy
from ..helpers import SUPER, USER1, USER2, Frame, lifecycle, wait_until


@pytest.fixture(params=GENERATIONS, ids=[g.name for g in GENERATIONS])
def events_path(request: pytest.FixtureRequest) -> str:
    """Every test here runs on each API generation's path: they share one stream."""
    generation: Generation = request.param
    return generation.path


def session_name(frame: Frame) -> str:
    data = frame.data
    return str(data["sessionName"] if "sessionName" in data else data["sessionId"])


def seqs(frames: list[Frame]) -> list[int]:
    return [int(f.id.rsplit(":", 1)[1]) for f in frames if f.id]


def append(upstream: UpstreamServer, start: int, n: int) -> None:
    upstream.log.append(
        [
            lifecycle("kernel_started", f"s{i}", USER1 if i % 3 else USER2)
            for i in range(start, start + n)
        ]
    )


async def test_reconnect_resumes_from_history_without_loss_or_duplicate(
    events_path: str, proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    async with proxy.stream(SUPER, path=events_path) as reader:
        await wait_until(lambda: proxy.running.hub.clients == 1)
        append(upstream, 0, 5)
        first = await reader.take(5)
    # Events happen while the client is away.
    append(upstream, 5, 5)
    await wait_until(lambda: proxy.running.hub.published == 10)
    last_id = first[2].id
    assert last_id is not None
    async with proxy.stream(SUPER, path=events_path, headers={"Last-Event-ID": last_id}) as reader:
        rest = await reader.take(7)
        assert await reader.nothing_within(0.2) == []
    assert seqs(first[:3] + rest) == list(range(1, 11))


async def test_last_event_id_query_parameter_for_a_first_connection(
    events_path: str, proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    append(upstream, 0, 6)
    await wait_until(lambda: proxy.running.hub.published == 6)
    async with proxy.stream(
        USER1, path=events_path, lastEventId=f"{upstream.log.log_id}:3"
    ) as reader:
        frames = await reader.take(2)  # USER1 owns s4 and s5 of s3..s5
    assert [session_name(f) for f in frames] == ["s4", "s5"]


async def test_resume_beyond_history_is_fetched_from_the_upstream(
    events_path: str, upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with started_proxy(nursery, upstream.target, history_size=3) as proxy:
        append(upstream, 0, 20)
        await wait_until(lambda: proxy.running.hub.published == 20)
        async with proxy.stream(
            SUPER, path=events_path, lastEventId=f"{upstream.log.log_id}:4"
        ) as reader:
            frames = await reader.take(16)
            append(upstream, 20, 2)
            frames += await reader.take(2)
    assert [f.event for f in frames] == ["kernel_started"] * 18
    assert seqs(frames) == list(range(5, 23))


async def test_events_gone_everywhere_are_announced_as_a_gap(
    events_path: str, nursery: trio.Nursery
) -> None:
    upstream = UpstreamServer(EventLog(capacity=5), "127.0.0.1:0")
    upstream.start()
    try:
        async with started_proxy(nursery, upstream.target, history_size=3) as proxy:
            # The upstream keeps 5 events, and this burst outruns even the proxy's
            # own subscription: 1..15 are gone before anyone reads them.
            append(upstream, 0, 20)
            await wait_until(lambda: proxy.running.hub.last_sequence == 20)
            log_id = upstream.log.log_id
            async with proxy.stream(SUPER, path=events_path, lastEventId=f"{log_id}:4") as reader:
                gap, *frames = await reader.take(6)
    finally:
        upstream.stop(0)
    assert gap.event == "stream_gap"
    assert gap.id is None
    assert gap.data == {
        "reason": "history-exhausted",
        "after": f"{log_id}:4",
        "before": f"{log_id}:16",
    }
    assert seqs(frames) == [16, 17, 18, 19, 20]


async def test_proxy_restart_resumes_clients_with_nothing_lost(
    events_path: str,
    upstream: UpstreamServer,
) -> None:
    received: list[Frame] = []
    async with trio.open_nursery() as first_run:
        async with started_proxy(first_run, upstream.target) as proxy:
            url = proxy.url
            async with proxy.stream(SUPER, path=events_path) as reader:
                await wait_until(lambda: proxy.running.hub.clients == 1)
                append(upstream, 0, 10)
                received += await reader.take(10)
        first_run.cancel_scope.cancel()
    # The proxy is gone; the cluster carries on.
    append(upstream, 10, 10)
    async with trio.open_nursery() as second_run:
        port = url.rsplit(":", 1)[1]
        async with started_proxy(second_run, upstream.target, bind=f"127.0.0.1:{port}") as proxy:
            assert proxy.url == url
            last_id = received[-1].id
            assert last_id is not None
            async with proxy.stream(
                SUPER, path=events_path, headers={"Last-Event-ID": last_id}
            ) as reader:
                await wait_until(lambda: proxy.running.hub.clients == 1)
                append(upstream, 20, 5)
                received += await reader.take(15)
                assert await reader.nothing_within(0.2) == []
        second_run.cancel_scope.cancel()
    assert [f.event for f in received] == ["kernel_started"] * 25
    assert seqs(received) == list(range(1, 26))


async def test_event_stream_clients_learn_their_position_without_any_event(
    events_path: str, upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with started_proxy(nursery, upstream.target, heartbeat_interval=0.3) as proxy:
        log_id = upstream.log.log_id
        append(upstream, 0, 3)  # s0 is USER2's, s1 and s2 are USER1's
        await wait_until(lambda: proxy.running.hub.published == 3)
        accept = {"Accept": "text/event-stream"}
        async with proxy.stream(USER2, path=events_path, headers=accept) as reader:
            # First block: where this client stands, as an id-only block (no event).
            assert (await reader.next()).raw == f"id: {log_id}:3\n\n".encode()
            append(upstream, 3, 2)  # s3 (USER2's), s4 (USER1's)
            (mine,) = await reader.take(1)
            assert session_name(mine) == "s3"
            # A quiet heartbeat moves the position past events that were not its own.
            assert (await reader.next(skip_comments=False)).raw == (
                f"id: {log_id}:5\n: ping\n\n".encode()
            )
        # Away for a while: its events are kept for it.
        append(upstream, 5, 4)  # s5 s6 s7 s8: USER2 owns s6
        await wait_until(lambda: proxy.running.hub.published == 9)
        async with proxy.stream(
            USER2, path=events_path, headers=accept | {"Last-Event-ID": f"{log_id}:5"}
        ) as reader:
            (missed,) = await reader.take(1)
            assert session_name(missed) == "s6"


async def test_sdk_style_clients_get_no_position_blocks(
    events_path: str, proxy: ProxyUnderTest
) -> None:
    async with proxy.stream(SUPER, path=events_path, headers={"Accept": "*/*"}) as reader:
        await wait_until(lambda: proxy.running.hub.clients == 1)
        assert await reader.nothing_within(0.2) == []
