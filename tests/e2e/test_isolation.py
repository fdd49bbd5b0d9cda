"""Tenant isolation under a randomized workload, end to end.

Many principals across roles, domains and users (some users with two keys), each with
random filters, hold real streams on a real proxy while a long random event stream
goes through the real gRPC upstream. Every client's stream is then compared, event by
event, with the independent reference policy (``tests/test_policy.py``): what it got
must be exactly what the reference says it may see, nothing it may not, nothing
missing. Seeded and bounded; a few seconds.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.config import Settings
from proxy.events import Event
from proxy.payloads import Payload
from proxy.policy import Filters, Principal, Role
from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest, make_settings
from ..helpers import EVENTS_PATH, Key, SSEReader, query, signed_headers, wait_until
from ..test_policy import reference_visible
from ..test_state import client_key, reference_map, rendered

DOMAINS = ["default", "research", "ops"]
GROUPS = ["g1", "g2", "g3"]
SESSIONS = [f"sess-{i}" for i in range(8)]
UUIDS = [str(uuid.UUID(int=i + 1, version=4)) for i in range(6)]
NAMES = [
    "kernel_preparing",
    "kernel_started",
    "kernel_terminated",
    "kernel_cancelled",
    "session_started",
    "session_failure",
]
V5_PATH = "/events/session"


def principals() -> list[Key]:
    keys: list[Key] = []
    for d, domain in enumerate(DOMAINS):
        for u in range(3):
            user = f"u-{domain}-{u}"
            keys.append(Key(f"AK{d}U{u}", f"secret-{d}-{u}-xxxxxxxx", "user", user, domain))
        # A second key of the same user: sees the same sessions as the first.
        keys.append(Key(f"AK{d}U0B", f"secret-{d}-0b-xxxxxxx", "user", f"u-{domain}-0", domain))
        keys.append(Key(f"AK{d}ADM", f"secret-{d}-adm-xxxxxx", "admin", f"a-{domain}", domain))
    keys.append(Key("AKROOT", "secret-root-xxxxxxxxxx", "superadmin", "root", "default"))
    return keys


KEYS = principals()


@dataclass
class Client:
    key: Key
    path: str
    params: dict[str, str]
    principal: Principal
    filters: Filters
    got: list[int]


def reference_filters(key: Key, path: str, params: dict[str, str]) -> Filters:
    """The filters a request asks for, resolved independently of proxy.policy."""
    v5 = path == V5_PATH
    session = (
        params.get("sessionName", params.get("name", "*")) if v5 else params.get("sessionId", "*")
    )
    owner = params.get("ownerAccessKey", params.get("owner_access_key", "*"))
    group = params.get("group", params.get("groupName", "*"))
    session_f = None if session == "*" else session
    owner_f = None if owner == "*" else owner
    if session_f is not None and owner_f is None:
        owner_f = key.access_key  # naming a session means your own, unless you say whose
    group_f = None if group == "*" else group
    if not v5:
        return Filters(session_f, owner_f, group_f)
    scope = params.get("scope", "*")
    prefix = None if scope == "*" else f"{scope}_"
    extra: dict[str, Any] = {"prefix": prefix, "main_only": False, "payload": Payload.V5}
    if "sessionId" in params:  # a UUID: it overrides the name and the owner
        return Filters(None, None, group_f, session_uuid=params["sessionId"], **extra)
    return Filters(session_f, owner_f, group_f, **extra)


def random_params(rng: random.Random, key: Key, path: str) -> dict[str, str]:
    params: dict[str, str] = {}
    if path == V5_PATH:
        if rng.random() < 0.2:
            params["sessionId"] = rng.choice(UUIDS)
        elif rng.random() < 0.4:
            params[rng.choice(["sessionName", "name"])] = rng.choice(SESSIONS)
        if rng.random() < 0.4:
            params["scope"] = rng.choice(["*", "session", "kernel"])
    elif rng.random() < 0.4:
        params["sessionId"] = rng.choice(SESSIONS)
    if rng.random() < 0.4:
        owner = rng.choice(KEYS).access_key if key.role != "user" else key.access_key
        params[rng.choice(["ownerAccessKey", "owner_access_key"])] = owner
    if rng.random() < 0.4:
        params[rng.choice(["group", "groupName"])] = rng.choice(GROUPS)
    return params


def random_event(rng: random.Random) -> pb.LifecycleEvent:
    owner = rng.choice(KEYS)
    user, domain, key = owner.user_id, owner.domain, owner.access_key
    # Mostly consistent sessions; some with owners, users and domains mixed up, or
    # unknown, as a confused (or hostile) upstream might send.
    if rng.random() < 0.2:
        user = rng.choice([k.user_id for k in KEYS] + ["u-ghost"])
    if rng.random() < 0.2:
        domain = rng.choice([*DOMAINS, "elsewhere"])
    if rng.random() < 0.1:
        key = "AKGHOST"
    return pb.LifecycleEvent(
        name=rng.choice(NAMES),
        session_id=rng.choice(SESSIONS),
        owner_access_key=key,
        user_id=user,
        domain_name=domain,
        group_name=rng.choice(GROUPS),
        session_uuid=rng.choice(["", *UUIDS]),
        cluster_role=rng.choice(["", "main", "sub"]),
        cluster_idx=rng.randrange(3),
    )


def sentinel(client: Client, index: int) -> pb.LifecycleEvent:
    """An event this client may see, so it knows when it has had everything."""
    p, f = client.principal, client.filters
    return pb.LifecycleEvent(
        name="session_started" if f.prefix == "session_" else "kernel_started",
        session_id=f.session or "sess-sentinel",
        owner_access_key=f.owner or p.access_key,
        user_id=p.user_id,
        domain_name=p.domain,
        group_name=f.group or "g1",
        kernel_id=f"sentinel-{index}",
        session_uuid=f.session_uuid or UUIDS[0],
        cluster_role="main",
    )


def as_event(sequence: int, msg: pb.LifecycleEvent) -> Event:
    return Event(
        sequence=sequence,
        name=msg.name,
        session_id=msg.session_id,
        kernel_id=msg.kernel_id,
        owner_access_key=msg.owner_access_key,
        user_id=msg.user_id,
        domain_name=msg.domain_name,
        group_name=msg.group_name,
        session_uuid=msg.session_uuid,
        cluster_role=msg.cluster_role,
        cluster_idx=msg.cluster_idx,
    )


@asynccontextmanager
async def isolation_proxy(nursery: trio.Nursery, target: str) -> AsyncIterator[ProxyUnderTest]:
    data = make_settings(target).model_dump(mode="python")
    data["keypairs"] = [k.settings().model_dump() | {"secret_key": k.secret_key} for k in KEYS]
    data["limits"] = {"max_streams_per_key": 1000}
    running: RunningProxy = await nursery.start(run_proxy, Settings.model_validate(data))
    await wait_until(lambda: running.bridge.live)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None), limits=limits) as client:
        yield ProxyUnderTest(running, client)
    running.shutdown()


@asynccontextmanager
async def client_stream(proxy: ProxyUnderTest, client: Client) -> AsyncIterator[SSEReader]:
    url = f"{proxy.url}{client.path}{query(**client.params)}"
    async with proxy.client.stream("GET", url, headers=signed_headers(url, client.key)) as response:
        assert response.status_code == 200, await response.aread()
        yield SSEReader(response)


@pytest.mark.parametrize("seed", [7, 2024])
async def test_every_client_gets_exactly_what_the_reference_policy_allows(
    upstream: UpstreamServer, nursery: trio.Nursery, seed: int
) -> None:
    rng = random.Random(seed)
    n_clients, n_events = 60, 1500
    async with isolation_proxy(nursery, upstream.target) as proxy:
        clients: list[Client] = []
        refused = 0
        for _ in range(n_clients):
            key = rng.choice(KEYS)
            path = rng.choice([EVENTS_PATH, V5_PATH])
            params = random_params(rng, key, path)
            if key.role == "user" and rng.random() < 0.1:
                # A user naming another owner's key: refused, never streamed.
                other = rng.choice([k for k in KEYS if k.access_key != key.access_key])
                response = await proxy.get(key, path=path, ownerAccessKey=other.access_key)
                assert response.status_code == 403, response.text
                refused += 1
                continue
            principal = Principal(key.access_key, Role(key.role), key.user_id, key.domain)
            filters = reference_filters(key, path, params)
            clients.append(Client(key, path, params, principal, filters, []))

        head = upstream.log.head
        messages = [random_event(rng) for _ in range(n_events)]
        messages += [sentinel(c, i) for i, c in enumerate(clients)]
        stream = [as_event(head + 1 + i, m) for i, m in enumerate(messages)]
        expected = [
            [e.sequence for e in stream if reference_visible(c.principal, c.filters, e)]
            for c in clients
        ]
        assert all(expected), "every client has at least its sentinel"

        async def read(client: Client, last: int, task_status: trio.TaskStatus[None]) -> None:
            async with client_stream(proxy, client) as reader:
                task_status.started()
                while not client.got or client.got[-1] < last:
                    frame = await reader.next()
                    assert frame.event in NAMES, (frame.event, frame.data)
                    assert frame.id is not None
                    # Each generation's own data shape: v5 names the session sessionName.
                    assert ("sessionName" in frame.data) == (client.path == V5_PATH)
                    client.got.append(int(frame.id.rsplit(":", 1)[1]))

        with trio.fail_after(60):
            async with trio.open_nursery() as readers:
                for client, want in zip(clients, expected, strict=True):
                    await readers.start(read, client, want[-1])
                await wait_until(lambda: proxy.running.hub.clients == len(clients))
                for start in range(0, len(messages), 400):
                    upstream.log.append(messages[start : start + 400])
        differences = [
            (c.key.access_key, c.params, sorted(set(c.got) ^ set(want)))
            for c, want in zip(clients, expected, strict=True)
            if c.got != want
        ]
        assert differences == []
        # It was a real test: many deliveries, of many kinds, to many principals.
        delivered = sum(len(c.got) for c in clients)
        assert delivered > n_events
        assert refused + len(clients) == n_clients
        assert {c.key.role for c in clients} == {"user", "admin", "superadmin"}
        assert {c.path for c in clients} == {EVENTS_PATH, V5_PATH}


@pytest.mark.parametrize("seed", [11, 4242])
async def test_state_clients_see_exactly_the_reference_state_and_nothing_else(
    upstream: UpstreamServer, nursery: trio.Nursery, seed: int
) -> None:
    """initialState=true clients, connected after half the log: state, then changes,
    must leave each with the map of a client that saw the whole log (independent
    policy), and nothing they were shown may be an event they may not see."""
    rng = random.Random(seed)
    head = upstream.log.head
    before = [random_event(rng) for _ in range(600)]
    upstream.log.append(before)
    async with isolation_proxy(nursery, upstream.target) as proxy:
        await wait_until(lambda: proxy.running.hub.last_sequence >= head + len(before))
        clients: list[Client] = []
        for _ in range(30):
            key = rng.choice(KEYS)
            path = rng.choice([EVENTS_PATH, V5_PATH])
            params = random_params(rng, key, path) | {"initialState": "true"}
            principal = Principal(key.access_key, Role(key.role), key.user_id, key.domain)
            filters = reference_filters(key, path, {k: v for k, v in params.items()
                                                    if k != "initialState"})  # fmt: skip
            clients.append(Client(key, path, params, principal, filters, []))
        after = [random_event(rng) for _ in range(600)]
        after += [sentinel(c, i) for i, c in enumerate(clients)]
        messages = before + after
        stream = [as_event(head + 1 + i, m) for i, m in enumerate(messages)]
        last = {
            id(c): max(e.sequence for e in stream if reference_visible(c.principal, c.filters, e))
            for c in clients
        }
        maps: dict[int, dict[Any, Any]] = {id(c): {} for c in clients}
        shown: dict[int, list[tuple[str, Any]]] = {id(c): [] for c in clients}

        async def read(client: Client, task_status: trio.TaskStatus[None]) -> None:
            async with client_stream(proxy, client) as reader:
                task_status.started()
                payload = client.filters.payload
                while True:
                    frame = await reader.next()
                    if frame.event in ("stream_state_begin", "stream_state_end"):
                        continue
                    assert frame.event in NAMES, (frame.event, frame.data)
                    shown[id(client)].append((frame.event, frame.data))
                    key = client_key(frame.event, frame.data, payload)
                    maps[id(client)][key] = (frame.event, frame.data)
                    if frame.id is not None and int(frame.id.rsplit(":", 1)[1]) >= last[id(client)]:
                        return

        with trio.fail_after(60):
            async with trio.open_nursery() as readers:
                for client in clients:
                    await readers.start(read, client)
                await wait_until(lambda: proxy.running.hub.clients == len(clients))
                upstream.log.append(after)
        for client in clients:
            want = reference_map(stream, client.principal, client.filters)
            assert maps[id(client)] == want, (client.key.access_key, client.params)
            allowed = [rendered(e, client.filters.payload) for e in stream
                       if reference_visible(client.principal, client.filters, e)]  # fmt: skip
            assert all(item in allowed for item in shown[id(client)])
        assert {c.path for c in clients} == {EVENTS_PATH, V5_PATH}
