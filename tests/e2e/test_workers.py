"""``serve --workers N`` as an operator runs it: a real supervisor and real workers.

A client cannot choose its worker: they all accept from one socket. To know which
worker serves a connection, a test asks ``/healthz`` first (a group's answer names
its worker) and then sends its real request on the same keep-alive connection
(``on_worker``). Waits are bounded, never timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from proxy.client import Credentials, StreamEvent, stream_events
from proxy.upstream_server import UpstreamServer

from ..helpers import (
    ADMIN,
    ALL_KEYS,
    EVENTS_PATH,
    SUPER,
    USER1,
    USER2,
    Key,
    SSEReader,
    lifecycle,
    signed_headers,
)
from .test_cli import free_port
from .test_keypairs_reload import FILE_KEY, NEW_KEY, write_keys
from .test_openapi import check
from .test_scale_out import Processes, Spawned

BIN: Final = Path(sys.executable).parent / "kernel-events-proxy"
STARTED_RE: Final = re.compile(r"worker (\d+) started \(pid (\d+)\)")
SERVING_RE: Final = re.compile(r"serving on (\S+) with (\d+) workers")
STREAM_OPEN_RE: Final = re.compile(
    r"worker (\d+) proxy\.stream: stream open: .* resume=(\S+)$", re.MULTILINE
)
TIMEOUT: Final = httpx.Timeout(10.0, read=None)


def group_toml(upstream: str, *, workers: int = 2, **sections: dict[str, Any]) -> str:
    server = {"bind": f"127.0.0.1:{free_port()}", "graceful_timeout": 2.0, "workers": workers}
    data: dict[str, dict[str, Any]] = {
        "server": server | sections.pop("server", {}),
        "upstream": {"target": upstream, "reconnect_min": 0.05, "reconnect_max": 0.5},
        **sections,
    }
    lines = []
    for name, values in data.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    for k in ALL_KEYS:
        lines += ["[[keypairs]]"] + [
            f'{field} = "{getattr(k, field)}"'
            for field in ("access_key", "secret_key", "role", "user_id", "domain")
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Group:
    """A supervisor started by the test (``Processes``: its output in a file)."""

    spawned: Spawned
    url: str = ""

    @property
    def process(self) -> trio.Process:
        return self.spawned.process

    def text(self) -> str:
        return self.spawned.log.read_text(errors="replace")

    def workers(self) -> dict[int, int]:
        """Worker index -> pid of its latest process."""
        return {int(i): int(pid) for i, pid in STARTED_RE.findall(self.text())}

    def stream_opens(self) -> list[tuple[int, str]]:
        return [(int(i), resume) for i, resume in STREAM_OPEN_RE.findall(self.text())]

    async def wait_for(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[Any]:
        with trio.fail_after(timeout):
            while True:
                found = re.findall(pattern, self.text(), re.MULTILINE)
                if len(found) >= count:
                    return found
                if self.process.returncode is not None:
                    raise AssertionError(f"the group exited:\n{self.text()}")
                await trio.sleep(0.02)


class Groups:
    """Supervisors, and at the end their workers too (in process groups of their own,
    which ``Processes.kill_all`` does not reach)."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.started: list[Group] = []

    async def start(self, *args: str) -> Group:
        name = f"group-{len(self.started)}"
        group = Group(await self.processes.start(name, str(BIN), *args))
        self.started.append(group)
        return group

    async def serving(self, *args: str) -> Group:
        group = await self.start(*args)
        ((url, _),) = await group.wait_for(SERVING_RE.pattern)
        group.url = url
        return group

    def kill_all(self) -> None:
        for group in self.started:
            for pid in group.workers().values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.processes.kill_all()


@pytest.fixture
def groups(tmp_path: Path) -> Iterator[Groups]:
    started = Groups(Processes(tmp_path))
    try:
        yield started
    finally:
        started.kill_all()


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"proxy-{len(list(tmp_path.glob('proxy-*.toml')))}.toml"
    path.write_text(text)
    return str(path)


@asynccontextmanager
async def on_worker(url: str, index: int, attempts: int = 200) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose one keep-alive connection worker ``index`` serves."""
    for _ in range(attempts):
        client = httpx.AsyncClient(
            timeout=TIMEOUT, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
        )
        try:
            health = (await client.get(f"{url}/healthz")).json()
            if health["worker"] == index:
                yield client
                return
        finally:
            await client.aclose()
    raise AssertionError(f"no connection reached worker {index} in {attempts} attempts")


@asynccontextmanager
async def stream_on(
    url: str, index: int, key: Key, headers: dict[str, str] | None = None
) -> AsyncIterator[SSEReader]:
    target = f"{url}{EVENTS_PATH}"
    async with (
        on_worker(url, index) as client,
        client.stream("GET", target, headers=signed_headers(target, key) | (headers or {})) as r,
    ):
        assert r.status_code == 200, (r.status_code, await r.aread())
        yield SSEReader(r)


async def status_on(url: str, index: int, key: Key) -> tuple[int, dict[str, Any]]:
    """A stream request's answer from worker ``index`` (an admitted stream is closed)."""
    target = f"{url}{EVENTS_PATH}"
    async with (
        on_worker(url, index) as client,
        client.stream("GET", target, headers=signed_headers(target, key)) as response,
    ):
        if response.status_code == 200:
            return 200, {}
        return response.status_code, json.loads(await response.aread())


def children_of(pid: int) -> list[str] | None:
    """A process's children's pids (None where the kernel does not say)."""
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


async def until(predicate: Any, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


def sample(metrics: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    assert match, f"{name} not in:\n{metrics}"
    return float(match.group(1))


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        response = await client.get(f"{url}/metrics")
        assert response.status_code == 200, response.text
        return response.text


# --- Settings -------------------------------------------------------------------------


def test_a_bad_worker_count_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    import subprocess

    path = config(tmp_path, group_toml("127.0.0.1:1", workers=1))
    for args, env, expected in [
        (["--workers", "0"], {}, "server.workers: "),
        (["--workers", "many"], {}, "server.workers: "),
        ([], {"KEP_SERVER__WORKERS": "-2"}, "server.workers (from KEP_SERVER__WORKERS): "),
    ]:
        result = subprocess.run(
            [str(BIN), "serve", "--config", path, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr
        assert 'or "auto" (one per core)' in result.stderr


def test_a_taken_port_is_a_clear_error_before_any_worker_starts(tmp_path: Path) -> None:
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = config(tmp_path, group_toml("127.0.0.1:1", server={"bind": f"127.0.0.1:{port}"}))
        result = subprocess.run(
            [str(BIN), "serve", "--config", path], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert f"server.bind: cannot listen on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )
    assert "worker" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_one_worker_is_one_process_with_no_supervisor(
    tmp_path: Path, upstream: UpstreamServer, groups: Groups
) -> None:
    path = config(tmp_path, group_toml(upstream.target, workers=1))
    group = await groups.start("serve", "--config", path)
    (url,) = await group.wait_for(r"proxy: serving on (\S+) \(upstream")
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        assert (await client.get(f"{url}/healthz")).json() == {"status": "ok"}
    assert children_of(group.process.pid) in ([], None)
    assert "worker" not in group.text()
    group.process.terminate()
    with trio.fail_after(20):
        assert await group.process.wait() == 0


# --- Limits, cookies and metrics for the whole group -------------------------------------


async def test_stream_caps_hold_for_the_group_not_per_worker(
    tmp_path: Path, upstream: UpstreamServer, groups: Groups
) -> None:
    metrics_bind = f"127.0.0.1:{free_port()}"
    limits = {"max_streams_per_key": 2, "max_streams": 3}
    path = config(
        tmp_path,
        group_toml(upstream.target, limits=limits, server={"metrics_bind": metrics_bind}),
    )
    group = await groups.serving("serve", "--config", path)
    url = group.url
    # The settings went down the control socket: no secret on a worker's command line.
    for pid in group.workers().values():
        argv = command_line(pid)
        assert "proxy.worker" in argv
        assert not any(k.secret_key in argv for k in ALL_KEYS), argv
    async with stream_on(url, 1, USER1), stream_on(url, 2, USER1):
        # The key's two slots are taken, one in each worker: a third is refused by both.
        for index in (1, 2):
            status, body = await status_on(url, index, USER1)
            assert (status, body["error"]) == (429, "too-many-streams")
        async with stream_on(url, 1, SUPER):
            for index in (1, 2):  # three streams in the group: the total cap
                status, body = await status_on(url, index, ADMIN)
                assert (status, body["error"]) == (503, "server-busy")
            metrics = await scrape(f"http://{metrics_bind}")
            assert sample(metrics, 'kep_clients{role="user"}') == 2
            assert sample(metrics, 'kep_clients{role="superadmin"}') == 1
            assert sample(metrics, 'kep_limited_requests_total{error="too-many-streams"}') == 2
            assert sample(metrics, 'kep_limited_requests_total{error="server-busy"}') == 2
            assert sample(metrics, 'kep_workers{state="running"}') == 2
    # Every slot came back, whichever worker held it: the caps can be used again.
    async with stream_on(url, 2, USER1), stream_on(url, 2, USER1), stream_on(url, 1, ADMIN):
        pass
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        assert (await client.get(f"{url}/metrics")).status_code == 404  # on its own bind
        ready = await client.get(f"{url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["workers"] == {"configured": 2, "running": 2, "upstream_live": 2}
        check(ready, "/readyz")
        check(await client.get(f"{url}/healthz"), "/healthz")
        upstream.stop(0)  # no worker's stream is live now: the group is not ready

        async def unready() -> bool:
            return (await client.get(f"{url}/readyz")).status_code == 503

        await until(unready)
        ready = await client.get(f"{url}/readyz")
        assert ready.json()["workers"] == {"configured": 2, "running": 2, "upstream_live": 0}
        check(ready, "/readyz")


async def login(client: httpx.AsyncClient, url: str, key: Key, secret: str | None = None) -> Any:
    return await client.post(
        f"{url}/server/login",
        json={"access_key": key.access_key, "secret_key": secret or key.secret_key},
    )


async def test_login_limits_and_a_generated_session_key_are_the_groups(
    tmp_path: Path, upstream: UpstreamServer, groups: Groups
) -> None:
    """No session.secret_key: one is made once, for every worker; a cookie one worker
    signs the other accepts. Login buckets count attempts on every worker together."""
    limits = {"login_attempts_per_address": 4, "login_failures_per_key": 2}
    path = config(tmp_path, group_toml(upstream.target, limits=limits))
    group = await groups.serving("serve", "--config", path)
    url = group.url
    async with on_worker(url, 1) as first:
        response = await login(first, url, USER1)  # attempt 1
        assert response.status_code == 200, response.text
        cookie = response.cookies["kep_session"]
    async with on_worker(url, 2) as second:
        second.cookies.set("kep_session", cookie)
        session = await second.get(f"{url}/server/session")
        assert session.status_code == 200, session.text
        assert session.json()["access_key"] == USER1.access_key
        target = f"{url}{EVENTS_PATH}"
        async with second.stream("GET", target, cookies={"kep_session": cookie}) as stream:
            assert stream.status_code == 200
    async with on_worker(url, 2) as second:
        assert (await login(second, url, USER2, "wrong")).status_code == 401  # attempt 2
    async with on_worker(url, 1) as first:
        assert (await login(first, url, USER2, "wrong")).status_code == 401  # attempt 3
    async with on_worker(url, 2) as second:
        refused = await login(second, url, USER2)  # attempt 4: USER2 failed twice
        assert (refused.status_code, refused.json()["error"]) == (429, "too-many-failures")
    for index in (1, 2):
        async with on_worker(url, index) as client:
            refused = await login(client, url, ADMIN)  # this address used its 4 attempts
            assert (refused.status_code, refused.json()["error"]) == (429, "too-many-attempts")
    assert group.text().count("browser sign-in: on, cookies signed with a random key") == 1


# --- Signals ------------------------------------------------------------------------------


async def test_sigterm_closes_every_workers_clients_and_the_group_exits_0(
    tmp_path: Path, upstream: UpstreamServer, groups: Groups
) -> None:
    path = config(tmp_path, group_toml(upstream.target))
    group = await groups.serving("serve", "--config", path)
    pids = group.workers()
    endings: dict[int, str | None] = {}

    async def listen(index: int) -> None:
        async with stream_on(group.url, index, SUPER) as reader:
            endings[index] = None
            frame = await reader.next()
            endings[index] = frame.event
            with contextlib.suppress(StopAsyncIteration):
                await reader.next()  # the stream ends after it

    async with trio.open_nursery() as nursery:
        for index in (1, 2):
            nursery.start_soon(listen, index)
        with trio.fail_after(20):
            while len(endings) < 2:
                await trio.sleep(0.02)
        group.process.send_signal(signal.SIGTERM)
    assert endings == {1: "server_close", 2: "server_close"}
    with trio.fail_after(20):
        assert await group.process.wait() == 0
    assert not any(map(running, pids.values()))
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(_host_port(group.url), timeout=2),
    ):
        pass


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


async def test_sighup_reloads_keypairs_in_every_worker(
    tmp_path: Path, upstream: UpstreamServer, groups: Groups
) -> None:
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file, FILE_KEY)
    path = config(tmp_path, group_toml(upstream.target, auth={"keypairs_file": str(keys_file)}))
    group = await groups.serving("serve", "--config", path)
    url = group.url
    before = keys_file.stat()
    closed: dict[int, Any] = {}

    async def revoked(index: int, opened: trio.Event) -> None:
        async with stream_on(url, index, FILE_KEY) as reader:
            opened.set()
            frame = await reader.next()
            closed[index] = (frame.event, frame.data)

    async with trio.open_nursery() as nursery:
        for index in (1, 2):
            opened = trio.Event()
            nursery.start_soon(revoked, index, opened)
            await opened.wait()
        for index in (1, 2):
            assert (await status_on(url, index, NEW_KEY))[0] == 401
        write_keys(keys_file, NEW_KEY)
        # Its old mtime back: only the signal, not the file watcher, can reload it.
        os.utime(keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        group.process.send_signal(signal.SIGHUP)
    assert closed == {i: ("server_close", {"reason": "credentials-revoked"}) for i in (1, 2)}
    for index in (1, 2):
        assert (await status_on(url, index, NEW_KEY))[0] == 200
        assert (await status_on(url, index, FILE_KEY))[0] == 401
    assert "received SIGHUP: reloading keypairs in 2 worker(s)" in group.text()


# --- A worker dies ------------------------------------------------------------------------


async def test_a_killed_worker_is_replaced_and_its_clients_resume_on_the_others(
    tmp_path: Path, upstream: UpstreamServer, groups: Groups
) -> None:
    path = config(tmp_path, group_toml(upstream.target, server={"heartbeat_interval": 1.0}))
    group = await groups.serving("serve", "--config", path)
    log_id = upstream.log.log_id
    clients = 8
    received: list[list[StreamEvent]] = [[] for _ in range(clients)]
    sent = 0

    def publish(n: int) -> None:
        nonlocal sent
        upstream.log.append([lifecycle("kernel_started", f"s{sent + i}", USER1) for i in range(n)])
        sent += n

    async def everyone_has(n: int) -> bool:
        return all(sum(e.id is not None for e in got) >= n for got in received)

    async def follow(i: int) -> None:
        events = stream_events(
            group.url,
            Credentials(SUPER.access_key, SUPER.secret_key),
            retry_delay=0.05,
            max_retry_delay=0.5,
            read_timeout=5.0,
        )
        async with aclosing(events) as stream:
            async for event in stream:
                received[i].append(event)

    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(follow, i)
        await group.wait_for(STREAM_OPEN_RE.pattern, count=clients)
        publish(20)
        await until(lambda: everyone_has(20))
        on = Counter(index for index, _ in group.stream_opens())
        assert sum(on.values()) == clients
        victim = max(on, key=lambda index: on[index])
        old_pid = group.workers()[victim]
        delivered = sample(await scrape(group.url), "kep_events_delivered_total")
        assert delivered >= clients * 20
        os.kill(old_pid, signal.SIGKILL)
        publish(20)  # while it is down
        await group.wait_for(rf"worker {victim} exited with signal SIGKILL")
        await group.wait_for(rf"worker {victim} started \(pid (\d+)\)", count=2)
        publish(20)
        await until(lambda: everyone_has(60))
        await trio.sleep(0.3)  # a duplicate would arrive now
        nursery.cancel_scope.cancel()

    expected = [f"{log_id}:{seq}" for seq in range(1, sent + 1)]
    for got in received:
        assert [e.name for e in got if e.id is None] == []  # no gap notice
        assert [e.id for e in got] == expected
    reopened = group.stream_opens()[clients:]
    assert len(reopened) >= on[victim]
    assert all(resume != "None" for _, resume in reopened)
    assert group.workers()[victim] != old_pid
    await group.wait_for(rf"worker {victim} serving", count=2)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        health = (await client.get(f"{group.url}/healthz")).json()
        assert health["workers"] == {"configured": 2, "running": 2}
    metrics = await scrape(group.url)
    assert sample(metrics, "kep_worker_restarts_total") == 1
    # What the dead worker had counted is still in the group's counters.
    assert sample(metrics, "kep_events_delivered_total") >= delivered
    assert sample(metrics, "kep_events_published_total") >= 20  # per worker


async def test_a_worker_failing_at_start_up_stops_the_group(
    tmp_path: Path, upstream: UpstreamServer, groups: Groups
) -> None:
    missing = tmp_path / "missing.pem"
    path = config(
        tmp_path,
        group_toml(upstream.target, server={"certfile": str(missing), "keyfile": str(missing)}),
    )
    group = await groups.start("serve", "--config", path)
    with trio.fail_after(30):
        code = await group.process.wait()
    assert code != 0
    assert "before it was serving: stopping" in group.text()


# --- The demo -----------------------------------------------------------------------------


async def test_the_demo_with_workers_is_one_demo(groups: Groups) -> None:
    group = await groups.serving("serve", "--demo", "--workers", "2", "--bind", "127.0.0.1:0")
    text = group.text()
    (user, secret) = re.findall(r"access key (AKDEMOUSER1), secret key (\S+)$", text, re.M)[0]
    assert text.count("kernel-events-proxy demo: ") == 1
    key = Key(user, secret, "user", "", "")
    cookie = ""
    for index in (1, 2):
        async with on_worker(group.url, index) as client:
            if not cookie:
                response = await login(client, group.url, key)
                assert response.status_code == 200, response.text
                cookie = response.cookies["kep_session"]
            else:
                client.cookies.set("kep_session", cookie)
                assert (await client.get(f"{group.url}/server/session")).status_code == 200
    (command,) = re.findall(r"^\s+(BACKEND_ACCESS_KEY=AKDEMOSUPER1 .* tail --url \S+)$", text, re.M)
    result = await trio.run_process(
        ["bash", "-c", f"{command} --json --count 3"], capture_stdout=True, check=False
    )
    assert result.returncode == 0
    assert len(result.stdout.decode().splitlines()) == 3
    group.process.send_signal(signal.SIGINT)
    with trio.fail_after(20):
        assert await group.process.wait() == 0


async def test_tls_and_http2_with_workers(
    tmp_path: Path, upstream: UpstreamServer, groups: Groups, tls: tuple[Any, Path, Path]
) -> None:
    """Each worker does its own TLS on the inherited socket; HTTP/2 streams work."""
    ca, certfile, keyfile = tls
    server = {"certfile": str(certfile), "keyfile": str(keyfile)}
    group = await groups.serving(
        "serve", "--config", config(tmp_path, group_toml(upstream.target, server=server))
    )
    assert group.url.startswith("https://")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    seen: set[int] = set()
    with trio.fail_after(30):
        while seen != {1, 2}:
            async with httpx.AsyncClient(http2=True, verify=context, timeout=TIMEOUT) as client:
                health = await client.get(f"{group.url}/healthz")
                assert health.http_version == "HTTP/2"
                seen.add(health.json()["worker"])
                url = f"{group.url}{EVENTS_PATH}"
                async with client.stream("GET", url, headers=signed_headers(url, SUPER)) as r:
                    assert r.status_code == 200
