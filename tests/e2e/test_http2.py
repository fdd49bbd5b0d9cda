"""HTTP/2 over TLS: many event streams share one connection."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import trio
import trustme

from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import UpstreamServer

from ..conftest import make_settings
from ..helpers import EVENTS_PATH, SUPER, SSEReader, lifecycle, signed_headers, wait_until


async def test_more_than_six_streams_on_one_http2_connection(
    tls: tuple[trustme.CA, Path, Path], upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    ca, certfile, keyfile = tls
    settings = make_settings(upstream.target)
    data = settings.model_dump(mode="python")
    data["server"] |= {"certfile": certfile, "keyfile": keyfile}
    data["keypairs"] = [
        kp.model_dump() | {"secret_key": kp.secret_key.get_secret_value()}
        for kp in settings.keypairs
    ]
    running: RunningProxy = await nursery.start(run_proxy, type(settings).model_validate(data))
    assert running.url.startswith("https://")
    await wait_until(lambda: running.bridge.live)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    n = 8
    url = f"{running.url}{EVENTS_PATH}"
    received: list[list[str]] = []
    async with httpx.AsyncClient(http2=True, verify=context, timeout=10) as client:

        async def listen() -> None:
            async with client.stream("GET", url, headers=signed_headers(url, SUPER)) as response:
                assert response.status_code == 200
                assert response.http_version == "HTTP/2"
                frames = await SSEReader(response).take(3)
                received.append([f.data["sessionId"] for f in frames])

        async with trio.open_nursery() as listeners:
            for _ in range(n):
                listeners.start_soon(listen)
            await wait_until(lambda: running.hub.clients == n)
            # Every stream is open at once, all on a single TCP (and TLS) connection.
            connections = client._transport._pool.connections  # type: ignore[attr-defined]
            assert len(connections) == 1
            upstream.log.append([lifecycle("kernel_started", f"s{i}", SUPER) for i in range(3)])
    # httpx leaves the streams open when their responses close (no RST_STREAM); the
    # connection closing releases every one of them.
    await wait_until(lambda: running.hub.clients == 0, timeout=5)
    assert received == [["s0", "s1", "s2"]] * n
    running.shutdown()


async def test_a_reset_stream_is_released_while_its_connection_stays(
    tls: tuple[trustme.CA, Path, Path], upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    """A client can end one HTTP/2 stream (RST_STREAM) and keep the connection: that
    stream's subscription must go at once, the other stream's must stay and deliver."""
    ca, certfile, keyfile = tls
    settings = make_settings(upstream.target)
    data = settings.model_dump(mode="python")
    data["server"] |= {"certfile": certfile, "keyfile": keyfile}
    data["keypairs"] = [
        kp.model_dump() | {"secret_key": kp.secret_key.get_secret_value()}
        for kp in settings.keypairs
    ]
    running: RunningProxy = await nursery.start(run_proxy, type(settings).model_validate(data))
    await wait_until(lambda: running.bridge.live)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    host, port = running.url.removeprefix("https://").split(":")
    stream = await trio.open_ssl_over_tcp_stream(
        host, int(port), ssl_context=context, https_compatible=True
    )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    url = f"{running.url}{EVENTS_PATH}"
    request = [
        (":method", "GET"),
        (":path", EVENTS_PATH),
        (":scheme", "https"),
        (":authority", f"{host}:{port}"),
        *signed_headers(url, SUPER).items(),
    ]
    for stream_id in (1, 3):
        conn.send_headers(stream_id, request, end_stream=True)
    await stream.send_all(conn.data_to_send())
    bodies: dict[int, bytes] = {1: b"", 3: b""}

    async def pump_until(done: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not done():
                for event in conn.receive_data(await stream.receive_some(65536)):
                    if isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += event.data
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                await stream.send_all(conn.data_to_send())

    async def check_clients(n: int) -> None:
        await wait_until(lambda: running.hub.clients == n, timeout=5)

    await check_clients(2)
    conn.reset_stream(1)
    await stream.send_all(conn.data_to_send())
    await check_clients(1)
    upstream.log.append([lifecycle("kernel_started", "after-reset", SUPER)])
    await pump_until(lambda: b"after-reset" in bodies[3])
    assert b"after-reset" not in bodies[1]
    await stream.aclose()
    await check_clients(0)
    running.shutdown()
