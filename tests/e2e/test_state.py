"""initialState=true over real sockets: the state, then changes from exactly there."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy._pb.kernel_events.v1.events_pb2_grpc import KernelEventsServiceServicer
from proxy.client import Credentials, StreamEvent, stream_events
from proxy.config import Settings
from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import EventLog, KernelEventsServicer, UpstreamServer

from ..conftest import ProxyUnderTest, make_settings, started_proxy
from ..helpers import ADMIN, EVENTS_PATH, USER1, USER2, Frame, SSEReader, lifecycle, wait_until
from .test_cli import free_port
from .test_openapi import check

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


# --- The JSON form: GET <stream path>/state -------------------------------------------


async def test_the_json_form_is_the_streams_state_and_its_position_resumes_the_stream(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with three_sessions(upstream, nursery) as proxy:
        for path, params in ((EVENTS_PATH, {}), (V5_PATH, {"scope": "*"})):
            response = await proxy.get(ADMIN, path=f"{path}/state", **params)
            check(response, f"{path}/state")
            state = response.json()
            async with proxy.stream(ADMIN, path=path, initialState="true", **params) as reader:
                _, body, end = await _state(reader)
            # The same events, names and data as the stream's state, and its position.
            assert state["events"] == [{"event": f.event, "data": f.data} for f in body]
            assert (state["position"], state["entities"]) == (end.id, end.data["entities"])
        assert len(state["events"]) == 3  # v5: the kernel is an entity of its own
        metrics = (await proxy.client.get(f"{proxy.url}/metrics")).text
        assert "kep_state_reads_total 2.0" in metrics
        # A script resumes the stream from the position: every change after it, once.
        upstream.log.append([lifecycle("session_terminated", "b", USER2)])
        log_id = upstream.log.log_id
        headers = {"Last-Event-ID": state["position"]}
        async with proxy.stream(ADMIN, headers) as reader:
            frame = await reader.next()
            assert (frame.event, frame.id) == ("session_terminated", f"{log_id}:6")


async def test_the_json_form_takes_the_streams_filters_and_refuses_in_json(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with three_sessions(upstream, nursery) as proxy:
        for path in (EVENTS_PATH, V5_PATH):
            state_path = f"{path}/state"
            mine = await proxy.get(USER2, path=state_path)
            check(mine, state_path)
            names = [
                e["data"].get("sessionName", e["data"]["sessionId"]) for e in mine.json()["events"]
            ]
            assert names == ["b"]
            refused = [
                (await proxy.get(None, path=state_path), 401, "missing"),
                (
                    await proxy.get(USER1, path=state_path, ownerAccessKey="AKUSER2"),
                    403,
                    "forbidden",
                ),
                (await proxy.get(ADMIN, path=state_path, lastEventId="x:1"), 400, "bad-parameter"),
                (
                    await proxy.get(ADMIN, path=state_path, initialState="true"),
                    400,
                    "bad-parameter",
                ),
                (await proxy.get(ADMIN, path=state_path, bogus="1"), 400, "bad-parameter"),
                (await proxy.get(ADMIN, path=state_path, group=""), 400, "bad-parameter"),
            ]
            for response, status, error in refused:
                check(response, state_path)
                assert (response.status_code, response.json()["error"]) == (status, error)
        only_b = await proxy.get(ADMIN, path=f"{EVENTS_PATH}/state", sessionId="b",
                                 ownerAccessKey="AKUSER2")  # fmt: skip
        assert [e["data"]["sessionId"] for e in only_b.json()["events"]] == ["b"]
        uuid = await proxy.get(ADMIN, path=f"{V5_PATH}/state", sessionId=UUID_A, scope="kernel")
        assert [e["event"] for e in uuid.json()["events"]] == ["kernel_terminated"]


async def test_a_state_request_while_the_state_is_reloaded_waits_for_it(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with three_sessions(upstream, nursery) as proxy:
        hub = proxy.running.hub
        # The first read has the state read from the upstream (state.idle_timeout).
        assert (await proxy.get(ADMIN, path=f"{EVENTS_PATH}/state")).status_code == 200
        loaded = hub.state
        assert loaded is not None
        hub.state_stale = True  # as after a gap the state does not cover
        got: list[Any] = []

        async def ask() -> None:
            got.append(await proxy.get(ADMIN, path=f"{EVENTS_PATH}/state"))

        async with trio.open_nursery() as inner:
            inner.start_soon(ask)
            await trio.sleep(0.2)
            assert not got
            hub.load_state(loaded)
        assert got[0].status_code == 200
        assert got[0].json()["entities"] == 2


async def test_without_a_snapshot_state_is_refused_in_json_and_streams_still_work(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    # An upstream from before the Snapshot rpc: it answers UNIMPLEMENTED.
    monkeypatch.setattr(KernelEventsServicer, "Snapshot", KernelEventsServiceServicer.Snapshot)
    old = UpstreamServer(EventLog(), "127.0.0.1:0")
    old.start()
    try:
        async with started_proxy(nursery, old.target) as proxy:
            # The proxy learns there is no snapshot when something first asks for it.
            first = await proxy.get(ADMIN, path=f"{EVENTS_PATH}/state")
            assert (first.status_code, first.json()["error"]) == (503, "state-unavailable")
            assert proxy.running.hub.state_unavailable
            for path in (EVENTS_PATH, V5_PATH):
                for response in (
                    await proxy.get(ADMIN, path=f"{path}/state"),
                    await proxy.get(ADMIN, path=path, initialState="true"),
                ):
                    assert response.status_code == 503
                    assert response.json()["error"] == "state-unavailable"
                    assert response.headers["Retry-After"] == "30"
                check(await proxy.get(ADMIN, path=f"{path}/state"), f"{path}/state")
            async with proxy.stream(ADMIN) as reader:
                old.log.append([lifecycle("session_started", "a", USER1)])
                assert (await reader.next()).event == "session_started"
    finally:
        old.stop(0)


# --- proxy.client.stream_events(initial_state=True) against real proxies ---------------


class ClientView:
    """What a consumer of ``stream_events(initial_state=True)`` holds: entity -> the
    name of its latest event, replaced at every state's begin."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str | None, str | None], str] = {}
        self.log: list[StreamEvent] = []

    def apply(self, event: StreamEvent) -> None:
        self.log.append(event)
        if event.is_state_begin:
            self.latest = {}
        elif not event.is_state_end:
            self.latest[(event.owner_access_key, event.session_name)] = event.name


async def test_the_client_follows_the_state_resumes_across_a_restart_and_resyncs(
    nursery: trio.Nursery,
) -> None:
    first = UpstreamServer(EventLog(), "127.0.0.1:0")
    first.start()
    _log_three_sessions(first.log)
    bind = f"127.0.0.1:{free_port()}"
    view = ClientView()

    async def consume() -> None:
        creds = Credentials(ADMIN.access_key, ADMIN.secret_key)
        events = stream_events(f"http://{bind}", creds, initial_state=True, retry_delay=0.05,
                               max_retry_delay=0.2)  # fmt: skip
        async with aclosing(events):
            async for event in events:
                view.apply(event)

    second: UpstreamServer | None = None
    try:
        async with trio.open_nursery() as run:
            async with started_proxy(run, first.target, bind=bind):
                nursery.start_soon(consume)
                await wait_until(lambda: any(e.is_state_end for e in view.log))
                assert view.latest == {("AKUSER2", "b"): "session_started",
                                       ("AKUSER1", "a"): "session_started"}  # fmt: skip
                assert [e.from_state for e in view.log] == [False, True, True, False]
                first.log.append([lifecycle("session_terminating", "b", USER2)])
                await wait_until(lambda: view.latest[("AKUSER2", "b")] == "session_terminating")
            run.cancel_scope.cancel()  # the proxy goes away; the cluster goes on
        first.log.append([lifecycle("session_terminated", "b", USER2)])
        seen = len(view.log)
        async with started_proxy(nursery, first.target, bind=bind) as proxy:
            # A resumable reconnect just resumes: the change, live, no state resent.
            await wait_until(lambda: view.latest[("AKUSER2", "b")] == "session_terminated")
            assert [(e.name, e.from_state, e.id) for e in view.log[seen:]] == [
                ("session_terminated", False, f"{first.log.log_id}:7")
            ]
            # The upstream comes back with a new log: a resync replaces the view.
            port = first.port
            first.stop(0)
            second = UpstreamServer(EventLog(), f"127.0.0.1:{port}")
            second.log.append([lifecycle("session_started", "z", USER1)])
            second.start()
            await wait_until(lambda: any(e.is_resync for e in view.log))
            await wait_until(lambda: view.log[-1].is_state_end)
            assert view.latest == {("AKUSER1", "z"): "session_started"}
            assert view.log[-1].id == f"{second.log.log_id}:1"
            assert proxy.running.hub.clients == 1
    finally:
        first.stop(0)
        if second is not None:
            second.stop(0)


async def test_with_group_adds_the_group_to_the_data_only_for_who_asks(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with three_sessions(upstream, nursery) as proxy:
        for path in (EVENTS_PATH, V5_PATH):
            plain = (await proxy.get(ADMIN, path=f"{path}/state")).json()["events"]
            grouped = await proxy.get(ADMIN, path=f"{path}/state", withGroup="true")
            check(grouped, f"{path}/state")
            events = grouped.json()["events"]
            groups = [e["data"].pop("group") for e in events]
            assert events == plain
            assert set(groups) <= {"g1", "g7"}
            async with (
                proxy.stream(ADMIN, path=path, initialState="true", withGroup="true") as reader,
                proxy.stream(ADMIN, path=path) as unasked,
            ):
                _, body, _ = await _state(reader)
                shown = {f.data["group"] for f in body}
                assert "g1" in shown
                assert shown <= {"g1", "g7"}
                upstream.log.append([lifecycle("session_started", "c", USER1, group="g7")])
                live = await reader.next()
                assert (live.event, live.data["group"]) == ("session_started", "g7")
                assert "group" not in (await unasked.next()).data
            bad = await proxy.get(ADMIN, path=path, withGroup="yes")
            assert (bad.status_code, bad.json()["error"]) == (400, "bad-parameter")
