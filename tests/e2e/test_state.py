"""initialState=true over real sockets: the state, then changes from exactly there."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.config import Settings
from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import EventLog, UpstreamServer

from ..conftest import ProxyUnderTest, make_settings, started_proxy
from ..helpers import ADMIN, EVENTS_PATH, USER1, USER2, Frame, SSEReader, lifecycle, wait_until

V5_PATH = "/events/session"


UUID_A = "00000000-0000-4000-8000-00000000000a"


def _log_three_sessions(log: EventLog) -> None:
    log.append(
        [
            lifecycle("session_enqueued", "a", USER1, session_uuid=UUID_A),
            lifecycle("kernel_started", "a", USER1, kernel_id="ka", cluster_role="main",
                      cluster_idx=1, session_uuid=UUID_A),
            lifecycle("session_started", "b", USER2),
            lifecycle("kernel_terminated", "a", USER1, kernel_id="ka", result=pb.RESULT_SUCCESS,
                      exit_code=0, cluster_role="main", cluster_idx=1,
                      session_uuid=UUID_A),
            lifecycle("session_started", "a", USER1, session_uuid=UUID_A),
        ]
    )  # fmt: skip


@asynccontextmanager
async def three_sessions(upstream: UpstreamServer, nursery: trio.Nursery) -> AsyncIterator[Any]:
    """A proxy attached to an upstream whose log already holds three sessions."""
    _log_three_sessions(upstream.log)
    async with started_proxy(nursery, upstream.target) as proxy:
        yield proxy


async def _state(reader: SSEReader) -> tuple[Frame, list[Frame], Frame]:
    begin = await reader.next()
    assert begin.event == "stream_state_begin", begin.raw
    body: list[Frame] = []
    while (frame := await reader.next()).event != "stream_state_end":
        body.append(frame)
    return begin, body, frame


async def test_the_state_frames_byte_for_byte_then_live_from_its_position(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    _log_three_sessions(upstream.log)
    log_id = upstream.log.log_id
    async with (
        started_proxy(nursery, upstream.target) as proxy,
        proxy.stream(ADMIN, initialState="true") as reader,
    ):
        begin, body, end = await _state(reader)
        assert begin.raw == b'event: stream_state_begin\ndata: {"reason": "initial"}\n\n'
        assert [f.raw for f in body] == [
            b"event: session_started\n"
            b'data: {"sessionId":"b","ownerAccessKey":"AKUSER2","reason":null}\n\n',
            b"event: session_started\n"
            b'data: {"sessionId":"a","ownerAccessKey":"AKUSER1","reason":null}\n\n',
        ]
        assert end.raw == (
            f"id: {log_id}:5\nevent: stream_state_end\n".encode() + b'data: {"entities": 2}\n\n'
        )
        upstream.log.append([lifecycle("session_terminated", "b", USER2)])
        live = await reader.next()
        assert (live.event, live.id) == ("session_terminated", f"{log_id}:6")
        # v5: kernels are entities of their own, in v5's shape, exactly as live.
        async with proxy.stream(ADMIN, path=V5_PATH, initialState="true") as reader:
            _, body, end = await _state(reader)
            assert [(f.event, f.data.get("sessionName"), f.data.get("kernelId")) for f in body] == [
                ("kernel_terminated", "a", "ka"),
                ("session_started", "a", None),
                ("session_terminated", "b", None),
            ]
            assert (body[0].data["exitCode"], body[0].data["clusterIdx"]) == (0, 1)
            assert (end.data, end.id) == ({"entities": 3}, f"{log_id}:6")


async def test_a_user_sees_only_their_own_sessions_in_the_state(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with (
        three_sessions(upstream, nursery) as proxy,
        proxy.stream(USER2, initialState="true") as reader,
    ):
        _, body, end = await _state(reader)
        assert [f.data["sessionId"] for f in body] == ["b"]
        assert end.data == {"entities": 1}
        async with proxy.stream(USER1, path=V5_PATH, initialState="true", scope="kernel") as r:
            _, body, _ = await _state(r)
            assert [f.event for f in body] == ["kernel_terminated"]


async def test_without_initial_state_nothing_changes(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with (
        three_sessions(upstream, nursery) as proxy,
        proxy.stream(ADMIN, initialState="false") as reader,
    ):
        upstream.log.append([lifecycle("session_terminated", "b", USER2)])
        frame = await reader.next()
        assert frame.event == "session_terminated"


@pytest.mark.parametrize("value", ["yes", "TRUE", "1", ""])
async def test_a_bad_initial_state_value_is_a_json_400(
    upstream: UpstreamServer, nursery: trio.Nursery, value: str
) -> None:
    async with started_proxy(nursery, upstream.target) as proxy:
        for path in (EVENTS_PATH, V5_PATH):
            response = await proxy.get(ADMIN, path=path, initialState=value)
            assert response.status_code == 400
            assert response.json()["error"] == "bad-parameter"


async def test_a_restarted_proxy_serves_the_same_state(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    _log_three_sessions(upstream.log)
    upstream.log.forget()  # the upstream's log is trimmed: its state table is not
    seen = []
    for _ in range(2):
        async with (
            started_proxy(nursery, upstream.target) as proxy,
            proxy.stream(ADMIN, initialState="true") as reader,
        ):
            _, body, end = await _state(reader)
            seen.append(([f.raw for f in body], end.raw))
    assert seen[0] == seen[1]
    assert len(seen[0][0]) == 2


async def test_a_resume_that_can_resume_just_resumes(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    _log_three_sessions(upstream.log)
    log_id = upstream.log.log_id
    async with started_proxy(nursery, upstream.target) as proxy:
        upstream.log.append([lifecycle("session_terminated", "b", USER2)])
        await wait_until(lambda: proxy.running.hub.last_sequence == 6)
        headers = {"Last-Event-ID": f"{log_id}:5"}
        async with proxy.stream(ADMIN, headers, initialState="true") as reader:
            frame = await reader.next()
            assert (frame.event, frame.id) == ("session_terminated", f"{log_id}:6")
        # Nothing needed a state: the proxy never read one (state.idle_timeout).
        assert proxy.running.hub.state is None


async def test_a_resume_from_a_log_that_is_gone_is_a_resync_not_a_gap(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    _log_three_sessions(upstream.log)
    async with started_proxy(nursery, upstream.target) as proxy:
        headers = {"Last-Event-ID": "someotherlog:3"}
        async with proxy.stream(ADMIN, headers, initialState="true") as reader:
            begin, body, end = await _state(reader)
            assert json.loads(begin.get("data") or "") == {"reason": "resync"}
            assert (len(body), end.id) == (2, f"{upstream.log.log_id}:5")


async def test_an_upstream_with_a_new_log_resyncs_state_streams(nursery: trio.Nursery) -> None:
    first = UpstreamServer(EventLog(), "127.0.0.1:0")
    port = first.port
    first.start()
    _log_three_sessions(first.log)
    async with (
        started_proxy(nursery, first.target) as proxy,
        proxy.stream(ADMIN, initialState="true") as reader,
    ):
        await _state(reader)
        first.stop(0)
        second = UpstreamServer(EventLog(), f"127.0.0.1:{port}")
        second.log.append([lifecycle("session_started", "z", USER1)])
        second.start()
        try:
            begin, body, end = await _state(reader)
            assert begin.data == {"reason": "resync"}
            assert [f.data["sessionId"] for f in body] == ["z"]
            assert end.id == f"{second.log.log_id}:1"
            second.log.append([lifecycle("session_terminated", "z", USER1)])
            live = await reader.next()
            assert (live.event, live.id) == ("session_terminated", f"{second.log.log_id}:2")
        finally:
            second.stop(0)


async def test_the_state_is_read_when_asked_kept_while_used_and_dropped_when_idle(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    # state.idle_timeout: no fold on the ingest path while nobody uses the state; the
    # first initialState stream has it read from the upstream (no event needs to
    # arrive for that), and a later one after it was dropped gets it right again.
    _log_three_sessions(upstream.log)
    data = make_settings(upstream.target, heartbeat_interval=0.2).model_dump(mode="python")
    data["state"] = {"idle_timeout": 0.5}
    running: RunningProxy = await nursery.start(run_proxy, Settings.model_validate(data))
    await wait_until(lambda: running.bridge.live)
    hub = running.hub
    assert hub.state is None  # nobody asked
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        proxy = ProxyUnderTest(running, client)
        async with proxy.stream(ADMIN, initialState="true") as reader:
            _, body, end = await _state(reader)
            assert [f.data["sessionId"] for f in body] == ["b", "a"]
            assert hub.state is not None
        # Idle: dropped by the heartbeat sweep; events go on meanwhile, unfolded.
        await wait_until(lambda: hub.state is None)
        upstream.log.append([lifecycle("session_terminated", "b", USER2)])
        await wait_until(lambda: hub.last_sequence == 6)
        async with proxy.stream(ADMIN, initialState="true") as reader:
            _, body, end = await _state(reader)
            assert [(f.event, f.data["sessionId"]) for f in body] == [
                ("session_started", "a"),
                ("session_terminated", "b"),
            ]
            assert end.id == f"{upstream.log.log_id}:6"
    assert running.bridge.snapshots == 2
    running.shutdown()
