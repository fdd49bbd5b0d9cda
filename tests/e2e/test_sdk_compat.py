"""The official Backend.AI client SDK (backend.ai-client 23.9.10), unchanged, as a client.

It runs in its own virtualenv (`make sdk-env`), as a separate process, through
`tests/sdk_client.py`, which uses the SDK's public API the way its users do.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest, started_proxy
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


# --- The SDK on /events/session: the proxy advertises v7.20230615 ---------------------

V7 = "v7.20230615"
U1, U2, U3 = (str(uuid.UUID(int=n, version=4)) for n in (1, 2, 3))
K_MAIN, K_SUB = "k-main-0001", "k-sub-0002"
EXIT_CODE_EVENTS = {"kernel_terminating", "kernel_terminated", "session_success", "session_failure"}


def cluster_log() -> list[pb.LifecycleEvent]:
    """USER1's cluster session c1 (U1: a main and a sub kernel), USER2's own c1 (U2) and
    USER1's o1 (U3), interleaved as a manager would publish them."""

    def kernel(name: str, session: str, owner: Key, sid: str, role: str, idx: int,
               **kw: Any) -> pb.LifecycleEvent:  # fmt: skip
        kid = K_MAIN if role == "main" else K_SUB
        return lifecycle(name, session, owner, session_uuid=sid, kernel_id=kid,
                         cluster_role=role, cluster_idx=idx, **kw)  # fmt: skip

    def session(name: str, session: str, owner: Key, sid: str, **kw: Any) -> pb.LifecycleEvent:
        return lifecycle(name, session, owner, session_uuid=sid, **kw)

    return [
        session("session_enqueued", "c1", USER1, U1),
        session("session_enqueued", "c1", USER2, U2),
        kernel("kernel_pulling", "c1", USER1, U1, "main", 0, reason="cr.example/python:3.11"),
        kernel("kernel_started", "c1", USER1, U1, "main", 0),
        kernel("kernel_started", "c1", USER1, U1, "sub", 1),
        session("session_started", "o1", USER1, U3),
        session("session_started", "c1", USER1, U1),
        kernel("kernel_started", "c1", USER2, U2, "main", 0),
        kernel("kernel_terminated", "c1", USER1, U1, "sub", 1, exit_code=0),
        kernel("kernel_terminated", "c1", USER1, U1, "main", 0, exit_code=0),
        session("session_success", "c1", USER1, U1, exit_code=0),
        session("session_terminated", "c1", USER1, U1),
    ]


def reference(
    caller: Key,
    log: list[pb.LifecycleEvent],
    *,
    name: str = "*",
    owner: str | None = None,
    session_uuid: str | None = None,
    scope: str = "*",
) -> list[dict[str, Any]]:
    """What the generations page says a /events/session client receives, written out."""
    out = []
    for e in log:
        if caller.role == "user":
            mine = e.user_id == caller.user_id and e.domain_name == caller.domain
        else:
            mine = caller.role == "superadmin" or e.domain_name == caller.domain
        if scope != "*" and not e.name.startswith(scope + "_"):
            continue
        if session_uuid is not None:
            wanted = e.session_uuid == session_uuid
        elif name != "*":
            wanted = e.session_id == name and e.owner_access_key == (owner or caller.access_key)
        else:
            wanted = True
        if not (mine and wanted):
            continue
        data: dict[str, Any] = {
            "reason": e.reason if e.HasField("reason") else None,
            "sessionName": e.session_id,
            "ownerAccessKey": e.owner_access_key,
            "sessionId": e.session_uuid,
            "exitCode": e.exit_code if e.name in EXIT_CODE_EVENTS else None,
        }
        if e.name.startswith("kernel_"):
            data |= {"kernelId": e.kernel_id, "clusterRole": e.cluster_role,
                     "clusterIdx": e.cluster_idx}  # fmt: skip
        out.append({"event": e.name, "data": data})
    return out


@pytest.fixture
async def proxy_v7(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> AsyncIterator[ProxyUnderTest]:
    async with started_proxy(nursery, upstream.target, api_version=V7) as running:
        yield running


@pytest.mark.parametrize(
    ("caller", "args", "expect"),
    [
        (USER1, ["--session", "c1"], {"name": "c1"}),
        (USER1, ["--session", "*"], {}),
        (ADMIN, ["--session", "c1", "--owner-access-key", USER2.access_key],
         {"name": "c1", "owner": USER2.access_key}),
        (ADMIN, ["--session", "*"], {}),
        (USER1, ["--session-uuid", U1], {"session_uuid": U1}),
        (ADMIN, ["--session-uuid", U2], {"session_uuid": U2}),
        (USER1, ["--session", "c1", "--scope", "session"], {"name": "c1", "scope": "session"}),
        (USER1, ["--session-uuid", U1, "--scope", "kernel"],
         {"session_uuid": U1, "scope": "kernel"}),
    ],
    ids=["own-name", "own-all", "admin-other-owner", "admin-all", "uuid", "admin-uuid",
         "scope-session", "scope-kernel"],
)  # fmt: skip
async def test_sdk_on_events_session_receives_what_the_spec_says(
    proxy_v7: ProxyUnderTest,
    upstream: UpstreamServer,
    caller: Key,
    args: list[str],
    expect: dict[str, Any],
) -> None:
    log = cluster_log()
    expected = reference(caller, log, **expect)
    assert expected, "the reference must expect something for the test to mean anything"
    opened = proxy_v7.running.hub.streams_opened["v5"]
    got = await sdk_receives(
        proxy_v7, upstream, caller, log, *args, "--expect-api-version", V7, count=len(expected)
    )
    assert [{"event": e["event"], "data": e["data"]} for e in got] == expected
    ids = [e["id"] for e in got]
    assert all(i.startswith(upstream.log.log_id + ":") for i in ids)
    assert ids == sorted(ids, key=lambda i: int(i.rsplit(":", 1)[1]))
    # The SDK chose /events/session (the v5 generation) from the advertised version.
    assert proxy_v7.running.hub.streams_opened["v5"] == opened + 1


async def test_sdk_on_v4_does_not_get_sub_kernel_events(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    log = cluster_log()
    got = await sdk_receives(proxy, upstream, USER1, log, "--session", "c1", count=7)
    assert [(e["event"], e["data"].get("kernelId")) for e in got] == [
        ("session_enqueued", None),
        ("kernel_pulling", K_MAIN),
        ("kernel_started", K_MAIN),
        ("session_started", None),
        ("kernel_terminated", K_MAIN),
        ("session_success", None),
        ("session_terminated", None),
    ]
    assert got[0]["data"] == {"sessionId": "c1", "ownerAccessKey": "AKUSER1", "reason": None}


async def test_sdk_on_v7_user_naming_another_owner_gets_403(proxy_v7: ProxyUnderTest) -> None:
    done = await run_sdk(
        proxy_v7, USER1, "--session", "x", "--owner-access-key", "AKUSER2",
        "--expect-error", "--expect-api-version", V7,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["error"] == 403
