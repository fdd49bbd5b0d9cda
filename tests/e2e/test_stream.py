"""End to end over real sockets: gRPC upstream -> proxy -> HTTP client."""

from __future__ import annotations

import json

import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest
from ..helpers import ADMIN, SUPER, USER1, USER2, Key, lifecycle, wait_until


async def subscribed(proxy: ProxyUnderTest, n: int) -> None:
    await wait_until(lambda: proxy.running.hub.clients >= n)


async def test_events_arrive_in_order_with_exact_bytes(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    log_id = upstream.log.log_id
    async with proxy.stream(SUPER) as reader:
        await subscribed(proxy, 1)
        upstream.log.append(
            [
                lifecycle("kernel_preparing", "sess-a", USER1, reason="scheduled", kernel_id="k-1"),
                lifecycle(
                    "kernel_terminated",
                    "sess-a",
                    USER1,
                    reason="self-terminated",
                    result=pb.RESULT_SUCCESS,
                    exit_code=0,
                    kernel_id="k-1",
                ),
            ]
        )
        first, second = await reader.take(2)
    assert (
        first.raw
        == (
            f"id: {log_id}:1\nevent: kernel_preparing\n"
            'data: {"sessionId":"sess-a","ownerAccessKey":"AKUSER1","reason":"scheduled",'
            '"kernelId":"k-1"}\n\n'
        ).encode()
    )
    assert (
        second.raw
        == (
            f"id: {log_id}:2\nevent: kernel_terminated\n"
            'data: {"sessionId":"sess-a","ownerAccessKey":"AKUSER1","reason":"self-terminated",'
            '"result":"SUCCESS","kernelId":"k-1","exitCode":0}\n\n'
        ).encode()
    )


async def test_response_headers(proxy: ProxyUnderTest) -> None:
    async with proxy.client.stream(
        "GET",
        f"{proxy.url}/stream/kernel/_/events",
        headers=__import__("tests.helpers", fromlist=["x"]).signed_headers(
            f"{proxy.url}/stream/kernel/_/events", SUPER
        ),
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"


async def test_many_events_keep_order(proxy: ProxyUnderTest, upstream: UpstreamServer) -> None:
    async with proxy.stream(SUPER) as reader:
        await subscribed(proxy, 1)
        for start in range(0, 2000, 250):
            upstream.log.append(
                [lifecycle("kernel_started", f"s-{i}", USER1) for i in range(start, start + 250)]
            )
        frames = await reader.take(2000)
    assert [f.data["sessionId"] for f in frames] == [f"s-{i}" for i in range(2000)]
    assert [int(f.id.rsplit(":", 1)[1]) for f in frames if f.id] == list(range(1, 2001))


async def test_unknown_event_name_passes_through(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    async with proxy.stream(USER1) as reader:
        await subscribed(proxy, 1)
        upstream.log.append([lifecycle("session_hibernated_v9", "sess-z", USER1, reason="new")])
        (frame,) = await reader.take(1)
    assert frame.event == "session_hibernated_v9"
    assert frame.data == {"sessionId": "sess-z", "ownerAccessKey": "AKUSER1", "reason": "new"}


async def test_each_role_sees_exactly_its_events(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    from ..helpers import RESEARCH_USER, USER1B

    events = [
        lifecycle("kernel_started", "u1-a", USER1),
        lifecycle("kernel_started", "u1-b", USER1B),  # same user, other keypair
        lifecycle("kernel_started", "u2-a", USER2),
        lifecycle("kernel_started", "adm-a", ADMIN),
        lifecycle("kernel_started", "res-a", RESEARCH_USER),
    ]
    expected = {
        USER1: ["u1-a", "u1-b"],
        USER2: ["u2-a"],
        ADMIN: ["u1-a", "u1-b", "u2-a", "adm-a"],
        SUPER: ["u1-a", "u1-b", "u2-a", "adm-a", "res-a"],
    }
    received: dict[str, list[str]] = {}
    extra: dict[str, list[str]] = {}
    async with trio.open_nursery() as nursery:

        async def read(key: Key) -> None:
            async with proxy.stream(key) as reader:
                frames = await reader.take(len(expected[key]))
                received[key.access_key] = [f.data["sessionId"] for f in frames]
                # ...and nothing it may not see arrives after them.
                late = await reader.nothing_within(0.3)
                extra[key.access_key] = [f.data["sessionId"] for f in late]

        for key in expected:
            nursery.start_soon(read, key)
        await subscribed(proxy, len(expected))
        upstream.log.append(events)
    assert extra == {k.access_key: [] for k in expected}
    assert received == {k.access_key: v for k, v in expected.items()}


async def test_session_and_group_filters_narrow(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    async with (
        proxy.stream(ADMIN, sessionId="target", ownerAccessKey="AKUSER2") as by_session,
        proxy.stream(SUPER, group="g2") as by_group,
        proxy.stream(USER1, sessionId="mine") as own_session,
    ):
        await subscribed(proxy, 3)
        upstream.log.append(
            [
                lifecycle("kernel_started", "target", USER1),  # same name, other owner
                lifecycle("kernel_started", "target", USER2, group="g2"),
                lifecycle("kernel_started", "mine", USER2),  # not USER1's
                lifecycle("kernel_started", "mine", USER1, group="g2"),
            ]
        )
        (a,) = await by_session.take(1)
        g1, g2 = await by_group.take(2)
        (o,) = await own_session.take(1)
        assert (a.data["sessionId"], a.data["ownerAccessKey"]) == ("target", "AKUSER2")
        assert [(f.data["sessionId"], f.data["ownerAccessKey"]) for f in (g1, g2)] == [
            ("target", "AKUSER2"),
            ("mine", "AKUSER1"),
        ]
        assert (o.data["sessionId"], o.data["ownerAccessKey"]) == ("mine", "AKUSER1")
        assert await by_session.nothing_within(0.3) == []
        assert await own_session.nothing_within(0.1) == []


async def test_heartbeat_comment(upstream: UpstreamServer, nursery: trio.Nursery) -> None:
    import httpx

    from proxy.server import run_proxy

    from ..conftest import make_settings
    from ..helpers import EVENTS_PATH, signed_headers

    running = await nursery.start(run_proxy, make_settings(upstream.target, heartbeat_interval=0.2))
    url = f"{running.url}{EVENTS_PATH}"
    async with (
        httpx.AsyncClient(timeout=None) as client,
        client.stream("GET", url, headers=signed_headers(url, SUPER)) as response,
    ):
        chunks = response.aiter_raw()
        with trio.fail_after(5):
            assert await chunks.__anext__() == b": ping\n\n"
    running.shutdown()


async def test_disconnect_releases_subscription(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    for _ in range(3):
        async with proxy.stream(USER1):
            await subscribed(proxy, 1)
        # The client has gone: within a second the proxy holds nothing for it.
        with trio.fail_after(1.0):
            while proxy.running.hub.clients:
                await trio.sleep(0.01)
    # And the hub keeps publishing to nobody without trouble.
    upstream.log.append([lifecycle("kernel_started", "x", USER1)])
    await wait_until(lambda: proxy.running.hub.published == 1)


async def test_version_document(proxy: ProxyUnderTest) -> None:
    response = await proxy.client.get(f"{proxy.url}/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["version"] == "v4.20190615"


async def test_readyz_reflects_upstream(proxy: ProxyUnderTest, upstream: UpstreamServer) -> None:
    response = await proxy.client.get(f"{proxy.url}/readyz")
    assert (response.status_code, response.json()["upstream"]) == (200, True)
    upstream.stop(0)
    await wait_until(lambda: not proxy.running.bridge.live)
    response = await proxy.client.get(f"{proxy.url}/readyz")
    assert (response.status_code, response.json()["upstream"]) == (503, False)


async def test_unknown_path_is_json_404(proxy: ProxyUnderTest) -> None:
    response = await proxy.client.get(f"{proxy.url}/nope")
    assert response.status_code == 404
    assert response.json()["status"] == 404
    response = await proxy.client.post(f"{proxy.url}/stream/kernel/_/events")
    assert response.status_code == 405
    assert json.loads(response.text)["status"] == 405
