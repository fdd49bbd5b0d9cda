"""Abuse limits over real sockets: stream caps, request sizes, slowloris, login rates.

A misbehaving client (many streams, a trickled request, a flood of logins) is cut off
with a clear JSON answer and ``Retry-After`` where waiting helps, and nobody else is
slowed or refused because of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trustme

from proxy.config import Settings
from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest, make_settings
from ..helpers import (
    ADMIN,
    EVENTS_PATH,
    SUPER,
    USER1,
    USER2,
    Key,
    lifecycle,
    signed_headers,
    wait_until,
)

SESSION_KEY = "limits-session-signing-key-" + "s" * 20


@asynccontextmanager
async def limited_proxy(
    nursery: trio.Nursery, target: str, **limits: Any
) -> AsyncIterator[ProxyUnderTest]:
    data = make_settings(target).model_dump(mode="python")
    data["limits"] = limits
    data["session"] = {"secret_key": SESSION_KEY}
    running: RunningProxy = await nursery.start(run_proxy, Settings.model_validate(data))
    await wait_until(lambda: running.bridge.live)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        yield ProxyUnderTest(running, client)
    running.shutdown()


def slots_held(proxy: ProxyUnderTest) -> int:
    # The streams open: each holds one admission slot for as long as it runs.
    return proxy.running.hub.clients


def assert_json_error(
    response: httpx.Response, status: int, error: str, *, retry_after: bool = False
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"status", "error", "title", "detail"}
    assert (body["status"], body["error"]) == (status, error)
    if retry_after:
        assert int(response.headers["retry-after"]) >= 1
    return body


async def raw_connect(url: str) -> trio.SocketStream:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return await trio.open_tcp_stream(parts.hostname, parts.port)


async def read_until_closed(stream: trio.SocketStream, limit: float) -> bytes:
    """Everything the server sends until it closes the connection (within ``limit``)."""
    got = b""
    with trio.fail_after(limit):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # a reset is a close too
                return got
            if not chunk:
                return got
            got += chunk


def signed_request(url: str, key: Key, target: str = EVENTS_PATH) -> bytes:
    host = urlsplit(url).netloc
    headers = signed_headers(f"{url}{target}", key)
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- Stream caps ------------------------------------------------------------------------


async def test_per_key_stream_cap_is_429_and_other_keys_still_stream(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with limited_proxy(nursery, upstream.target, max_streams_per_key=3) as proxy:
        async with proxy.stream(USER1), proxy.stream(USER1):
            async with proxy.stream(USER1):
                body = assert_json_error(
                    await proxy.get(USER1), 429, "too-many-streams", retry_after=True
                )
                assert "max_streams_per_key" in body["detail"]
                assert (await proxy.get(USER1)).headers["retry-after"] == "5"
                # Another key of the same user is a different key: not affected.
                async with proxy.stream(USER2), proxy.stream(SUPER):
                    pass
            # One closed: its slot is free again at once.
            await wait_until(lambda: slots_held(proxy) == 2)
            async with proxy.stream(USER1):
                pass
        metrics = (await proxy.client.get(f"{proxy.url}/metrics")).text
        assert 'kep_limited_requests_total{error="too-many-streams"} 2.0' in metrics


async def test_total_stream_cap_is_503(upstream: UpstreamServer, nursery: trio.Nursery) -> None:
    async with limited_proxy(nursery, upstream.target, max_streams=2) as proxy:
        async with proxy.stream(USER1), proxy.stream(ADMIN):
            assert_json_error(await proxy.get(SUPER), 503, "server-busy", retry_after=True)
        await wait_until(lambda: slots_held(proxy) == 0)
        async with proxy.stream(SUPER):
            pass


async def test_a_burst_of_simultaneous_connections_cannot_overshoot_the_cap(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    """Thirty requests sent at once: exactly the cap is admitted, the rest get 429.

    Admission takes a slot synchronously when the request is handled, not when the
    stream subscribes later, so there is no window for a burst to slip through.
    """
    cap, n = 5, 30
    async with limited_proxy(nursery, upstream.target, max_streams_per_key=cap) as proxy:
        streams = [await raw_connect(proxy.url) for _ in range(n)]
        statuses: list[int] = []

        async def fire(stream: trio.SocketStream) -> None:
            await stream.send_all(signed_request(proxy.url, USER1))
            head = b""
            while b"\r\n" not in head:
                head += await stream.receive_some(4096)
            statuses.append(int(head.split(b" ", 2)[1]))

        with trio.fail_after(10):
            async with trio.open_nursery() as burst:
                for stream in streams:
                    burst.start_soon(fire, stream)
        assert sorted(statuses) == [200] * cap + [429] * (n - cap)
        await wait_until(lambda: proxy.running.hub.clients == cap)
        for stream in streams:
            await stream.aclose()
        await wait_until(lambda: proxy.running.hub.clients == 0)
        # Every slot came back: the full cap can be used again.
        async with proxy.stream(USER1), proxy.stream(USER1):
            pass


async def test_a_client_opening_many_streams_does_not_slow_the_others(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with limited_proxy(nursery, upstream.target, max_streams_per_key=10) as proxy:
        hogs = [await raw_connect(proxy.url) for _ in range(100)]
        try:
            for hog in hogs:
                await hog.send_all(signed_request(proxy.url, USER1))
            await wait_until(lambda: proxy.running.hub.clients == 10)
            # The other tenants' streams open at once and see their events promptly.
            started = time.monotonic()
            async with proxy.stream(ADMIN) as reader:
                upstream.log.append([lifecycle("kernel_started", "s-admin", ADMIN)])
                (frame,) = await reader.take(1, timeout=5)
            assert frame.data["sessionId"] == "s-admin"
            assert time.monotonic() - started < 2.0
            assert proxy.running.hub.clients_by_role["user"] == 10
        finally:
            for hog in hogs:
                await hog.aclose()


# --- Request sizes ------------------------------------------------------------------------


async def test_long_query_is_414_json(upstream: UpstreamServer, nursery: trio.Nursery) -> None:
    async with limited_proxy(nursery, upstream.target, max_query_length=256) as proxy:
        body = assert_json_error(await proxy.get(SUPER, group="g" * 300), 414, "uri-too-long")
        assert "max_query_length" in body["detail"]
        # Every route, authenticated or not.
        assert_json_error(
            await proxy.client.get(f"{proxy.url}/healthz?{'x' * 300}"), 414, "uri-too-long"
        )
        # At the limit it is served.
        assert (await proxy.client.get(f"{proxy.url}/healthz?{'x' * 256}")).status_code == 200


async def test_large_headers_are_431_json_and_huge_ones_are_cut_by_the_http_layer(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with limited_proxy(
        nursery, upstream.target, max_header_bytes=2048, max_query_length=256
    ) as proxy:
        response = await proxy.client.get(f"{proxy.url}/healthz", headers={"X-Pad": "p" * 3000})
        assert_json_error(response, 431, "headers-too-large")
        # A head still arriving past the limits (headers + query + 8 KiB) is refused by
        # the HTTP layer before it is buffered any further, and the connection closed:
        # memory per connection stays bounded however long the head would have been.
        stream = await raw_connect(proxy.url)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):  # noqa: PT012
            with trio.fail_after(5):
                for _ in range(100):
                    await stream.send_all(b"p" * 1024)
                    await trio.sleep(0.01)
        await stream.aclose()
        stream = await raw_connect(proxy.url)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 12_000)
        answer = await read_until_closed(stream, 5)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["status"] == 431
        assert body["error"] == "headers-too-large"
        await stream.aclose()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\nHost: x\r\n\r\n",
    ],
)
async def test_malformed_http_is_a_json_400(
    upstream: UpstreamServer, nursery: trio.Nursery, request_bytes: bytes
) -> None:
    async with limited_proxy(nursery, upstream.target) as proxy:
        stream = await raw_connect(proxy.url)
        await stream.send_all(request_bytes)
        answer = await read_until_closed(stream, 5)
        head, _, raw_body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:100]
        assert b"content-type: application/json" in head.lower()
        body = json.loads(raw_body)
        assert body["status"] == 400
        assert body["error"] == "bad-request"
        assert body["detail"]
        await stream.aclose()


# --- Slowloris ------------------------------------------------------------------------------


async def test_a_slowloris_sending_headers_byte_by_byte_is_cut_off(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    """Headers trickled a byte at a time: closed after idle_timeout; others unaffected."""
    async with limited_proxy(nursery, upstream.target, idle_timeout=1.0) as proxy:
        lorises = [await raw_connect(proxy.url) for _ in range(20)]
        closed_after: list[float] = []
        started = time.monotonic()

        async def trickle(stream: trio.SocketStream) -> None:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            try:
                with trio.fail_after(10):
                    while True:
                        await stream.send_all(b"X")
                        await trio.sleep(0.1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            closed_after.append(time.monotonic() - started)

        async def watch(stream: trio.SocketStream) -> None:
            await read_until_closed(stream, 10)
            closed_after.append(time.monotonic() - started)
            await stream.aclose()

        async with trio.open_nursery() as attack:
            for loris in lorises:
                attack.start_soon(watch, loris)
                attack.start_soon(trickle, loris)
            # Meanwhile, ordinary clients are served at once.
            await trio.sleep(0.3)
            for _ in range(5):
                t0 = time.monotonic()
                assert (await proxy.client.get(f"{proxy.url}/healthz")).status_code == 200
                assert time.monotonic() - t0 < 0.5
        # Every slow connection was closed about idle_timeout after it opened.
        assert len(closed_after) >= 20
        assert max(closed_after) < 4.0, closed_after


async def test_a_connection_that_never_sends_a_request_is_closed(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with limited_proxy(nursery, upstream.target, idle_timeout=0.5) as proxy:
        stream = await raw_connect(proxy.url)
        t0 = time.monotonic()
        assert await read_until_closed(stream, 5) == b""
        assert time.monotonic() - t0 < 3
        await stream.aclose()


async def test_an_open_stream_is_not_an_idle_connection(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    """The idle timeout must never cut a quiet event stream (the client sends nothing)."""
    async with (
        limited_proxy(nursery, upstream.target, idle_timeout=0.3) as proxy,
        proxy.stream(SUPER) as reader,
    ):
        await trio.sleep(1.2)
        upstream.log.append([lifecycle("kernel_started", "still-here", USER1)])
        (frame,) = await reader.take(1, timeout=5)
        assert frame.data["sessionId"] == "still-here"


async def test_a_trickled_login_body_is_408(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with limited_proxy(nursery, upstream.target, body_timeout=0.5) as proxy:
        stream = await raw_connect(proxy.url)
        host = urlsplit(proxy.url).netloc
        await stream.send_all(
            f"POST /server/login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"access_key"'.encode()
        )
        t0 = time.monotonic()
        answer = await read_until_closed(stream, 5)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"error":"body-timeout"' in answer
        assert time.monotonic() - t0 < 3
        await stream.aclose()


# --- Login rate limits ----------------------------------------------------------------------


async def login(
    client: httpx.AsyncClient, url: str, key: Key, secret: str | None = None, **headers: str
) -> httpx.Response:
    return await client.post(
        f"{url}/server/login",
        json={"access_key": key.access_key, "secret_key": secret or key.secret_key},
        headers=headers,
    )


async def test_login_attempts_are_limited_per_address_without_blocking_other_addresses(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with limited_proxy(
        nursery, upstream.target, login_attempts_per_address=3, login_window=60.0
    ) as proxy:
        for _ in range(3):
            assert (await login(proxy.client, proxy.url, USER1, "wrong")).status_code == 401
        response = await login(proxy.client, proxy.url, USER1)  # even the right secret
        body = assert_json_error(response, 429, "too-many-attempts", retry_after=True)
        assert "retry in" in body["detail"]
        assert 1 <= int(response.headers["retry-after"]) <= 20
        # A client on another address (127.0.0.2 is loopback too) is not affected.
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(transport=transport, timeout=10) as other:
            assert (await login(other, proxy.url, USER2)).status_code == 200
        # Signed requests are not logins: they still stream.
        async with proxy.stream(USER1):
            pass


async def test_failed_logins_are_limited_per_access_key_known_or_not(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    ghost = Key("AKNOBODY", "whatever-secret-xx", "user", "x", "default")
    async with limited_proxy(
        nursery, upstream.target, login_failures_per_key=2, login_window=60.0
    ) as proxy:
        for key in (USER1, ghost):
            for _ in range(2):
                assert (await login(proxy.client, proxy.url, key, "wrong")).status_code == 401
            # Known or not, the same answer: the limit says nothing about which keys exist.
            assert_json_error(
                await login(proxy.client, proxy.url, key),
                429,
                "too-many-failures",
                retry_after=True,
            )
        # Other keys sign in as usual; a success never counts against a key.
        for _ in range(5):
            assert (await login(proxy.client, proxy.url, USER2)).status_code == 200


async def test_behind_a_trusted_proxy_logins_are_limited_per_forwarded_client(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    async with limited_proxy(
        nursery,
        upstream.target,
        login_attempts_per_address=2,
        trusted_proxies=["127.0.0.1"],
    ) as proxy:
        for _ in range(2):
            await login(proxy.client, proxy.url, USER1, "x", **{"X-Forwarded-For": "198.51.100.1"})
        blocked = await login(proxy.client, proxy.url, USER1, **{"X-Forwarded-For": "198.51.100.1"})
        assert blocked.status_code == 429
        # A client cannot escape by writing its own X-Forwarded-For: the proxy appends
        # the real address and the rightmost untrusted hop counts.
        forged = await login(
            proxy.client, proxy.url, USER1, **{"X-Forwarded-For": "1.1.1.1, 198.51.100.1"}
        )
        assert forged.status_code == 429
        fine = await login(proxy.client, proxy.url, USER1, **{"X-Forwarded-For": "198.51.100.2"})
        assert fine.status_code == 200


@pytest.mark.parametrize("status", [429, 503])
async def test_limit_answers_match_the_openapi_document(
    upstream: UpstreamServer, nursery: trio.Nursery, status: int
) -> None:
    from .test_openapi import check

    limits = {"max_streams_per_key": 1} if status == 429 else {"max_streams": 1}
    async with limited_proxy(nursery, upstream.target, **limits) as proxy, proxy.stream(USER1):
        response = await proxy.get(USER1)
        assert response.status_code == status
        check(response, EVENTS_PATH)


async def test_a_refused_unfinished_body_closes_the_connection(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    """Regression: answering before the body arrived left the socket open for good.

    Hypercorn closed it from the request's task, which quart-trio was cancelling, so
    the close never happened (hypercorn issue #106; ``server._close_even_when_cancelled``).
    """
    async with limited_proxy(nursery, upstream.target, idle_timeout=30.0) as proxy:
        stream = await raw_connect(proxy.url)
        host = urlsplit(proxy.url).netloc
        await stream.send_all(
            f"POST /server/login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\n\r\n{".encode()
        )
        answer = await read_until_closed(stream, 3)  # well before the idle timeout
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b'"error":"body-too-large"' in answer
        await stream.aclose()


async def test_a_tls_client_that_never_finishes_its_handshake_is_cut_off(
    upstream: UpstreamServer, nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    data = make_settings(upstream.target).model_dump(mode="python")
    data["server"] |= {"certfile": certfile, "keyfile": keyfile}
    data["limits"] = {"handshake_timeout": 0.5, "idle_timeout": 30.0}
    running: RunningProxy = await nursery.start(run_proxy, Settings.model_validate(data))
    try:
        stalled = await raw_connect(running.url)  # TCP only: not one byte of TLS
        half = await raw_connect(running.url)
        await half.send_all(b"\x16\x03\x01\x00\xff\x01")  # a ClientHello that never ends
        t0 = time.monotonic()
        for stream in (stalled, half):
            assert await read_until_closed(stream, 5) == b""
            await stream.aclose()
        assert time.monotonic() - t0 < 3
    finally:
        running.shutdown()
