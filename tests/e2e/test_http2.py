"""HTTP/2 over TLS: many event streams share one connection."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import UpstreamServer

from ..conftest import make_settings
from ..helpers import EVENTS_PATH, SUPER, SSEReader, lifecycle, signed_headers, wait_until


@pytest.fixture
def tls(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return ca, certfile, keyfile


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
    assert received == [["s0", "s1", "s2"]] * n
    running.shutdown()
