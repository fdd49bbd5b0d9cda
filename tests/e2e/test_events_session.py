"""``GET /events/session`` (API v5 and later) beside v4's path, from one hub.

Each of the original's shortcomings listed in shared/spec/backendai-generations.md has
a test here showing it does not happen (``test_not_*``); the rest shows that what the
v4 path has (ids, heartbeats, shutdown, cookies, tokens, CORS, limits, metrics) the v5
path has too. Resume, catch-up and gaps run on both paths in test_resume.py.
"""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack

import httpx
import pytest
import trio

from proxy.config import ConfigError, load_settings
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest, started_proxy
from ..helpers import (
    ADMIN,
    EVENTS_PATH,
    SUPER,
    USER1,
    USER2,
    Frame,
    SSEReader,
    lifecycle,
    wait_until,
)
from .test_limits import limited_proxy
from .test_login import DASH, bearer, browser_settings, login, serving

V5 = "/events/session"
UUID_A, UUID_B = (str(uuid.UUID(int=n, version=4)) for n in (10, 11))


async def test_one_event_has_the_same_id_on_both_paths_in_each_shape(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    async with proxy.stream(SUPER) as old, proxy.stream(SUPER, path=V5) as new:
        await wait_until(lambda: proxy.running.hub.clients == 2)
        upstream.log.append(
            [
                lifecycle(
                    "kernel_terminated", "s1", USER1, reason="self-terminated", exit_code=0,
                    kernel_id="k1", session_uuid=UUID_A, cluster_role="main",
                )
            ]
        )  # fmt: skip
        (a,), (b,) = await old.take(1), await new.take(1)
    log_id = upstream.log.log_id
    assert (
        a.raw
        == (
            f"id: {log_id}:1\nevent: kernel_terminated\n"
            'data: {"sessionId":"s1","ownerAccessKey":"AKUSER1","reason":"self-terminated",'
            '"result":"UNDEFINED","kernelId":"k1","exitCode":0}\n\n'
        ).encode()
    )
    assert (
        b.raw
        == (
            f"id: {log_id}:1\nevent: kernel_terminated\n"
            'data: {"reason":"self-terminated","sessionName":"s1","ownerAccessKey":"AKUSER1",'
            f'"sessionId":"{UUID_A}","exitCode":0,"kernelId":"k1","clusterRole":"main",'
            '"clusterIdx":0}\n\n'
        ).encode()
    )


async def test_not_dropping_session_level_events(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    # 23.09.10 looked these up in the wrong table and never delivered them.
    names = ["session_enqueued", "session_scheduled", "session_started", "session_cancelled"]
    async with proxy.stream(USER1, path=V5, sessionName="s1") as reader:
        await wait_until(lambda: proxy.running.hub.clients == 1)
        upstream.log.append([lifecycle(n, "s1", USER1, session_uuid=UUID_A) for n in names])
        assert [f.event for f in await reader.take(4)] == names


async def test_not_refusing_a_subscription_without_a_session_name(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    # 25.13-25.14 answered 400 without a session name.
    async with proxy.stream(USER1, path=V5) as reader:
        await wait_until(lambda: proxy.running.hub.clients == 1)
        upstream.log.append(
            [
                lifecycle("session_started", "theirs", USER2),
                lifecycle("session_started", "a", USER1),
            ]
        )
        (frame,) = await reader.take(1)
        assert frame.data["sessionName"] == "a"


async def test_not_ignoring_the_session_uuid_filter(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    # 25.15 and later sent every visible session to a subscriber by UUID.
    async with proxy.stream(USER1, path=V5, sessionId=UUID_B) as reader:
        await wait_until(lambda: proxy.running.hub.clients == 1)
        upstream.log.append(
            [
                lifecycle("session_started", "a", USER1, session_uuid=UUID_A),
                lifecycle("kernel_started", "b", USER1, session_uuid=UUID_B),
                lifecycle("session_started", "b", USER1, session_uuid=UUID_B),
            ]
        )
        frames = await reader.take(2)
        assert [(f.event, f.data["sessionId"]) for f in frames] == [
            ("kernel_started", UUID_B),
            ("session_started", UUID_B),
        ]
        assert await reader.nothing_within(0.2) == []


async def test_not_withholding_kernel_events_from_a_named_session_or_exit_codes(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    # 25.15 and later: no kernel_* events for a named session, and exitCode always null
    # (so `session watch` exited 0 on a failure).
    async with proxy.stream(USER1, path=V5, name="job") as reader:
        await wait_until(lambda: proxy.running.hub.clients == 1)
        upstream.log.append(
            [
                lifecycle("kernel_started", "job", USER1, cluster_role="sub", cluster_idx=2),
                lifecycle("kernel_terminated", "job", USER1, exit_code=137),
                lifecycle("session_failure", "job", USER1, exit_code=137),
            ]
        )
        started, terminated, failure = await reader.take(3)
    assert (started.data["clusterRole"], started.data["clusterIdx"]) == ("sub", 2)
    assert (terminated.data["exitCode"], failure.data["exitCode"]) == (137, 137)
    assert terminated.data["clusterIdx"] == 0  # sent, not dropped as the original did


@pytest.mark.parametrize(("spelling", "value"), [("name", "n1"), ("groupName", "g2")])
async def test_not_ignoring_the_aliases(
    proxy: ProxyUnderTest, upstream: UpstreamServer, spelling: str, value: str
) -> None:
    # Later releases dropped `name` and `group`'s alias while the SDK still sends them.
    async with proxy.stream(ADMIN, None, path=V5, **{spelling: value}) as reader:
        await wait_until(lambda: proxy.running.hub.clients == 1)
        upstream.log.append(
            [
                lifecycle("session_started", "other", ADMIN, group="g1"),
                lifecycle("session_started", "n1", ADMIN, group="g2"),
            ]
        )
        (frame,) = await reader.take(1)
        assert (frame.data["sessionName"], frame.event) == ("n1", "session_started")
        assert await reader.nothing_within(0.2) == []


async def test_not_leaving_clients_without_server_close_at_shutdown(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    # The original sent no server_close on this path: its SDK reconnected forever.
    async with (
        started_proxy(nursery, upstream.target, heartbeat_interval=0.2) as proxy,
        proxy.stream(SUPER, path=V5) as reader,
    ):
        await wait_until(lambda: proxy.running.hub.clients == 1)
        raw = await reader.next(skip_comments=False)
        assert raw.raw == b": ping\n\n"  # heartbeats on this path too
        proxy.running.shutdown()
        (close,) = await reader.take(1)
    assert (close.event, close.data) == ("server_close", {"reason": "server-shutdown"})


@pytest.mark.parametrize(
    ("params", "status", "error"),
    [
        ({"sessionId": "mysession-01"}, 400, "bad-parameter"),
        ({"scope": "everything"}, 400, "bad-parameter"),
        ({"sessionName": "a", "name": "b"}, 400, "bad-parameter"),
        ({"sessionName": "s", "ownerAccessKey": "AKUSER2"}, 403, "forbidden"),
        ({"lastEventId": "nope"}, 400, "bad-last-event-id"),
    ],
)
async def test_bad_parameters_are_json_errors(
    proxy: ProxyUnderTest, params: dict[str, str], status: int, error: str
) -> None:
    response = await proxy.get(USER1, None, path=V5, **params)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.headers["content-type"] == "application/json"


async def test_overflow_then_resume_on_v5(upstream: UpstreamServer, nursery: trio.Nursery) -> None:
    async with started_proxy(nursery, upstream.target, outbox_limit=5) as proxy:
        async with proxy.stream(SUPER, path=V5) as reader:
            await wait_until(lambda: proxy.running.hub.clients == 1)
            upstream.log.append([lifecycle("session_started", f"s{i}", USER1) for i in range(20)])
            frames: list[Frame] = []
            with trio.fail_after(5):
                while not frames or frames[-1].event != "stream_overflow":
                    frames.append(await reader.next())
        received = [f for f in frames if f.id]
        last = received[-1].id
        assert last is not None
        async with proxy.stream(SUPER, {"Last-Event-ID": last}, path=V5) as reader:
            rest = await reader.take(20 - len(received))
    assert [f.data["sessionName"] for f in received + rest] == [f"s{i}" for i in range(20)]


async def test_stream_caps_count_both_paths_and_metrics_say_which(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with started_proxy(nursery, upstream.target) as proxy, AsyncExitStack() as stack:
        for path in (EVENTS_PATH, V5, V5):
            await stack.enter_async_context(proxy.stream(USER1, path=path))
        await wait_until(lambda: proxy.running.hub.clients == 3)
        text = (await proxy.client.get(f"{proxy.url}/metrics")).text
        assert 'kep_clients_by_api{api="v4"} 1.0' in text
        assert 'kep_clients_by_api{api="v5"} 2.0' in text
        assert 'kep_streams_opened_total{api="v5"} 2.0' in text


async def test_per_key_cap_holds_over_both_paths(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with AsyncExitStack() as stack:
        running = await stack.enter_async_context(
            limited_proxy(nursery, upstream.target, max_streams_per_key=2)
        )
        await stack.enter_async_context(running.stream(USER1))
        await stack.enter_async_context(running.stream(USER1, path=V5))
        refused = await running.get(USER1, path=V5)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "too-many-streams"


async def test_cookie_bearer_and_cors_on_v5(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    settings = browser_settings(upstream.target)
    async with serving(nursery, settings) as url, httpx.AsyncClient(timeout=10) as client:
        assert (await login(client, url, USER1)).status_code == 200
        headers = {"Origin": DASH}
        async with client.stream("GET", f"{url}{V5}", headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == DASH
            reader = SSEReader(response)
            upstream.log.append(
                [lifecycle("session_started", "x", USER2), lifecycle("session_started", "y", USER1)]
            )
            (frame,) = await reader.take(1)
            assert frame.data["sessionName"] == "y"
        token = bearer(role="user", user_id=USER2.user_id, sub=USER2.access_key)
        async with (
            httpx.AsyncClient(timeout=10) as anonymous,
            anonymous.stream("GET", f"{url}{V5}", headers=token) as response,
        ):
            assert response.status_code == 200
            reader = SSEReader(response)
            upstream.log.append([lifecycle("session_started", "z", USER2)])
            (frame,) = await reader.take(1)
            assert frame.data["sessionName"] == "z"


@pytest.mark.parametrize("version", ["v4.20190615", "v7.20230615", "v9.20250722"])
async def test_get_root_advertises_the_configured_version(
    upstream: UpstreamServer, nursery: trio.Nursery, version: str
) -> None:
    async with started_proxy(nursery, upstream.target, api_version=version) as proxy:
        body = (await proxy.client.get(f"{proxy.url}/")).json()
        assert body["version"] == version
        # Both paths are served whatever is advertised.
        for path in (EVENTS_PATH, V5):
            async with proxy.stream(SUPER, path=path):
                pass


@pytest.mark.parametrize("bad", ["v3.20190615", "v10.20250101", "v7.20231345", "7.20230615"])
def test_a_bad_advertised_version_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"api\.version"):
        load_settings(None, {"KEP_API__VERSION": bad})
