"""The official Backend.AI client SDK (backend.ai-client 23.9.10), unchanged, as a client.

It runs in its own virtualenv (`make sdk-env`), as a separate process, through
`tests/sdk_client.py`, which uses the SDK's public API the way its users do.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest
from ..helpers import ADMIN, USER1, USER2, Key, lifecycle, wait_until

ROOT = Path(__file__).resolve().parents[2]
SDK_PYTHON = Path(os.environ.get("KEP_SDK_PYTHON", ROOT / ".venv-sdk" / "bin" / "python"))

pytestmark = pytest.mark.sdk


@pytest.fixture(autouse=True)
def _sdk_installed() -> None:
    if not SDK_PYTHON.exists():
        pytest.fail(f"the SDK environment is missing: run `make sdk-env` ({SDK_PYTHON})")


async def run_sdk(
    proxy: ProxyUnderTest, key: Key, *args: str, count: int = 1, timeout: float = 20.0
) -> subprocess.CompletedProcess[bytes]:
    cmd = [
        str(SDK_PYTHON),
        str(ROOT / "tests" / "sdk_client.py"),
        "--endpoint",
        proxy.url,
        "--access-key",
        key.access_key,
        "--secret-key",
        key.secret_key,
        "--count",
        str(count),
        "--timeout",
        str(timeout),
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "SORNA_"))}
    return await trio.run_process(
        cmd, capture_stdout=True, capture_stderr=True, check=False, env=env
    )


async def sdk_receives(
    proxy: ProxyUnderTest,
    upstream: UpstreamServer,
    key: Key,
    events: list[pb.LifecycleEvent],
    *args: str,
    count: int,
) -> list[dict[str, Any]]:
    result: list[subprocess.CompletedProcess[bytes]] = []
    clients_before = proxy.running.hub.clients

    async def sdk() -> None:
        result.append(await run_sdk(proxy, key, *args, count=count))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sdk)
        await wait_until(lambda: proxy.running.hub.clients > clients_before, timeout=30)
        upstream.log.append(events)
    (done,) = result
    assert done.returncode == 0, (done.returncode, done.stderr.decode())
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


async def test_sdk_user_receives_only_own_events(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    log_id = upstream.log.log_id
    got = await sdk_receives(
        proxy,
        upstream,
        USER1,
        [
            lifecycle("kernel_started", "theirs", USER2),
            lifecycle("kernel_started", "mine", USER1, reason="ready"),
            lifecycle(
                "kernel_terminated",
                "mine",
                USER1,
                reason="self-terminated",
                result=pb.RESULT_FAILURE,
                exit_code=3,
            ),
        ],
        "--session",
        "*",
        count=2,
    )
    assert got == [
        {
            "event": "kernel_started",
            "id": f"{log_id}:2",
            "data": {"sessionId": "mine", "ownerAccessKey": "AKUSER1", "reason": "ready"},
        },
        {
            "event": "kernel_terminated",
            "id": f"{log_id}:3",
            "data": {
                "sessionId": "mine",
                "ownerAccessKey": "AKUSER1",
                "reason": "self-terminated",
                "result": "FAILURE",
                "exitCode": 3,
            },
        },
    ]


async def test_sdk_admin_names_a_session_and_owner(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    got = await sdk_receives(
        proxy,
        upstream,
        ADMIN,
        [
            lifecycle("kernel_started", "shared-name", USER1),
            lifecycle("kernel_started", "other", USER2),
            lifecycle("kernel_started", "shared-name", USER2),
        ],
        "--session",
        "shared-name",
        "--owner-access-key",
        USER2.access_key,
        count=1,
    )
    assert [(e["data"]["sessionId"], e["data"]["ownerAccessKey"]) for e in got] == [
        ("shared-name", "AKUSER2")
    ]


async def test_sdk_group_filter(proxy: ProxyUnderTest, upstream: UpstreamServer) -> None:
    got = await sdk_receives(
        proxy,
        upstream,
        ADMIN,
        [
            lifecycle("kernel_started", "a", USER1, group="g1"),
            lifecycle("kernel_started", "b", USER2, group="g2"),
        ],
        "--session",
        "*",
        "--group",
        "g2",
        count=1,
    )
    assert [e["data"]["sessionId"] for e in got] == ["b"]


async def test_sdk_bad_secret_gets_401(proxy: ProxyUnderTest) -> None:
    forged = Key(USER1.access_key, "wrong-secret-value", "user", "u1", "default")
    done = await run_sdk(proxy, forged, "--session", "*", "--expect-error")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["error"] == 401


async def test_sdk_user_naming_another_owner_gets_403(proxy: ProxyUnderTest) -> None:
    done = await run_sdk(
        proxy, USER1, "--session", "x", "--owner-access-key", "AKUSER2", "--expect-error"
    )
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["error"] == 403


async def test_sdk_stops_on_server_close(proxy: ProxyUnderTest) -> None:
    result: list[subprocess.CompletedProcess[bytes]] = []

    async def sdk() -> None:
        result.append(await run_sdk(proxy, USER1, "--session", "*", count=5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sdk)
        await wait_until(lambda: proxy.running.hub.clients == 1, timeout=30)
        proxy.running.shutdown()
    (done,) = result
    # Exit 4: the SDK saw `server_close` and stopped listening, before 5 events.
    assert done.returncode == 4, (done.returncode, done.stderr.decode())
    assert json.loads(done.stdout.decode().splitlines()[-1])["event"] == "server_close"
