"""Fixtures: a real in-process gRPC upstream and a real proxy on a loopback socket."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

from proxy.config import Settings
from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import EventLog, UpstreamServer

from .helpers import ALL_KEYS, EVENTS_PATH, Key, SSEReader, query, signed_headers, wait_until


@pytest.fixture
def tls(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    """A CA, and a certificate and key it signed for 127.0.0.1 (TLS, HTTP/2)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return ca, certfile, keyfile


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer(EventLog(capacity=10_000), "127.0.0.1:0")
    server.start()
    yield server
    server.stop(0)


def make_settings(target: str, *, api_version: str | None = None, **server: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"bind": "127.0.0.1:0", "graceful_timeout": 2.0, **server},
            "upstream": {"target": target, "reconnect_min": 0.05, "reconnect_max": 0.5},
            "api": {"version": api_version} if api_version else {},
            "keypairs": [
                k.settings().model_dump() | {"secret_key": k.secret_key} for k in ALL_KEYS
            ],
        }
    )


@dataclass
class ProxyUnderTest:
    running: RunningProxy
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.running.url

    @asynccontextmanager
    async def stream(
        self,
        key: Key,
        headers: dict[str, str] | None = None,
        *,
        path: str = EVENTS_PATH,
        **params: str,
    ) -> AsyncIterator[SSEReader]:
        url = f"{self.url}{path}{query(**params)}"
        all_headers = signed_headers(url, key) | (headers or {})
        async with self.client.stream("GET", url, headers=all_headers) as response:
            assert response.status_code == 200, (response.status_code, await response.aread())
            yield SSEReader(response)

    async def get(
        self,
        key: Key | None,
        headers: dict[str, str] | None = None,
        *,
        path: str = EVENTS_PATH,
        **params: str,
    ) -> httpx.Response:
        url = f"{self.url}{path}{query(**params)}"
        all_headers = (signed_headers(url, key) if key else {}) | (headers or {})
        return await self.client.get(url, headers=all_headers)


@asynccontextmanager
async def started_proxy(
    nursery: trio.Nursery, target: str, *, api_version: str | None = None, **server: Any
) -> AsyncIterator[ProxyUnderTest]:
    """A proxy on a loopback port, attached to ``target``; shut down on exit."""
    settings = make_settings(target, api_version=api_version, **server)
    running: RunningProxy = await nursery.start(run_proxy, settings)
    await wait_until(lambda: running.bridge.live)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        yield ProxyUnderTest(running, client)
    running.shutdown()


@pytest.fixture
async def proxy(upstream: UpstreamServer, nursery: trio.Nursery) -> AsyncIterator[ProxyUnderTest]:
    async with started_proxy(nursery, upstream.target) as running:
        yield running
