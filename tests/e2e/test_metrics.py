"""GET /metrics after real traffic, parsed as Prometheus text."""

from __future__ import annotations

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest, started_proxy
from ..helpers import ADMIN, SUPER, USER1, USER2, Key, lifecycle, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_after_traffic(proxy: ProxyUnderTest, upstream: UpstreamServer) -> None:
    await proxy.get(None)  # missing signature
    forged = Key(USER1.access_key, "not-the-secret-at-all", "user", "u1", "default")
    await proxy.get(forged)
    async with (
        proxy.stream(SUPER) as all_events,
        proxy.stream(USER1) as mine,
        proxy.stream(ADMIN),
    ):
        await wait_until(lambda: proxy.running.hub.clients == 3)
        upstream.log.append(
            [lifecycle("kernel_started", f"s{i}", USER1 if i % 2 else USER2) for i in range(10)]
        )
        await all_events.take(10)
        await mine.take(5)
        response = await proxy.client.get(f"{proxy.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(response.text)
    assert got[("kep_clients", (("role", "superadmin"),))] == 1
    assert got[("kep_clients", (("role", "admin"),))] == 1
    assert got[("kep_clients", (("role", "user"),))] == 1
    assert got[("kep_upstream_events_total", ())] == 10
    assert got[("kep_events_published_total", ())] == 10
    # superadmin 10 + admin 10 (all in its domain) + user 5
    assert got[("kep_events_delivered_total", ())] == 25
    assert got[("kep_events_dropped_total", ())] == 0
    assert got[("kep_upstream_live", ())] == 1
    assert got[("kep_upstream_connects_total", ())] == 1
    assert got[("kep_auth_failures_total", (("reason", "missing"),))] == 1
    assert got[("kep_auth_failures_total", (("reason", "bad-signature"),))] == 1
    assert got[("kep_delivery_latency_seconds_count", ())] >= 2
    assert got[("kep_delivery_latency_seconds_bucket", (("le", "+Inf"),))] >= 2


async def test_metrics_on_a_separate_bind(upstream: UpstreamServer, nursery: trio.Nursery) -> None:
    async with started_proxy(nursery, upstream.target, metrics_bind="127.0.0.1:0") as proxy:
        url = proxy.running.metrics_url
        assert url is not None
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
        assert response.status_code == 200
        assert "kep_upstream_live 1.0" in response.text
        # ...and not on the public bind.
        assert (await proxy.client.get(f"{proxy.url}/metrics")).status_code == 404
