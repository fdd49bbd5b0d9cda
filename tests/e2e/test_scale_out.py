"""Scale-out on a real load balancer: two replicas behind nginx, one killed mid-stream.

Everything is a real process on loopback: the shipped upstream following a JSON Lines
file (so the test knows exactly what was sent), two proxy replicas with the same
keypairs and upstream, and nginx running the shipped ``deploy/nginx.conf`` with only
its placeholders filled in. Clients with different roles and filters stream through
nginx with ``proxy.client.stream_events``; one replica gets SIGKILL while events
flow; clients that were on it reconnect through nginx to the survivor and resume with
Last-Event-ID. Every client must end with exactly the events it may see: none lost,
none twice, no gap notice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import httpx
import pytest
import trio

from proxy.client import Credentials, StreamEvent, stream_events

from ..helpers import (
    ADMIN,
    ALL_KEYS,
    RESEARCH_ADMIN,
    RESEARCH_USER,
    SUPER,
    USER1,
    USER1B,
    USER2,
    Key,
    wait_for_http,
)

BIN: Final = Path(sys.executable).parent / "kernel-events-proxy"
NGINX_CONF: Final = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
NGINX_INSTALL_HINT: Final = (
    "nginx is not installed, and this test runs the shipped deploy/nginx.conf in a real "
    "nginx: install it with `apt-get install nginx` (or `make system-deps`)"
)

TOTAL_EVENTS: Final = 300
BATCH: Final = 10
KILL_AFTER_BATCHES: Final = 15  # the victim dies with 150 of the 300 events sent
PLACEHOLDER_RE: Final = re.compile(r"@[A-Z0-9_]+@")
STREAM_OPEN_RE: Final = re.compile(r"stream open: (\S+) \(\S+\) .* resume=(\S+)$", re.MULTILINE)

NAMES: Final = (
    "kernel_preparing",
    "kernel_pulling",
    "kernel_creating",
    "kernel_started",
    "kernel_terminated",
    "kernel_cancelled",
)
OWNERS: Final = (USER1, USER1B, USER2, RESEARCH_USER, ADMIN)
GROUPS: Final = ("g1", "g2")
LATE_SESSION: Final = 99


# -- what is sent, and who may see it (computed here, not by proxy.policy) ------------


def session_name(owner: Key, n: int) -> str:
    return f"sess-{owner.access_key.lower()}-{n}"


def event_line(i: int, owner: Key, group: str, session: int) -> dict[str, str]:
    name = NAMES[i % len(NAMES)]
    line = {
        "name": name,
        "sessionId": session_name(owner, session),
        "ownerAccessKey": owner.access_key,
        "userId": owner.user_id,
        "domainName": owner.domain,
        "groupName": group,
        "reason": f"step-{i}",
    }
    if name == "kernel_terminated":
        line["result"] = "SUCCESS"
    return line


def make_events(n: int, seed: int = 20240611) -> list[dict[str, str]]:
    # The first events give every watcher below something to see, so that each has
    # a Last-Event-ID before the kill; the rest are random.
    rng = random.Random(seed)
    first = [
        event_line(i, owner, group, 1)
        for i, (owner, group) in enumerate((o, g) for o in OWNERS for g in GROUPS)
    ]
    rest = [
        event_line(i, rng.choice(OWNERS), rng.choice(GROUPS), rng.randrange(4))
        for i in range(len(first), n)
    ]
    events = first + rest
    # ...except one session that only starts after the kill: its watcher has received
    # no event when its replica dies, and must still miss nothing (it resumes from the
    # id-only position blocks the proxy sends to text/event-stream clients).
    for i in range(KILL_AFTER_BATCHES * BATCH + 3, n, 7):
        events[i] = event_line(i, USER2, "g1", LATE_SESSION)
    return events


@dataclass(frozen=True)
class Watch:
    """One client: who it is and what it asks for."""

    label: str
    key: Key
    session: str | None = None
    owner: str | None = None
    group: str | None = None

    def may_see(self, event: dict[str, str]) -> bool:
        key = self.key
        if key.role == "user" and (
            event["userId"] != key.user_id or event["domainName"] != key.domain
        ):
            return False
        if key.role == "admin" and event["domainName"] != key.domain:
            return False
        # Naming a session without an owner means one's own sessions.
        owner = self.owner if self.owner is not None or self.session is None else key.access_key
        return (
            (self.group is None or self.group == event["groupName"])
            and (self.session is None or self.session == event["sessionId"])
            and (owner is None or owner == event["ownerAccessKey"])
        )


WATCHES: Final = (
    Watch("superadmin, everything", SUPER),
    Watch("superadmin, owner AKUSER1", SUPER, owner=USER1.access_key),
    Watch("admin, domain default", ADMIN),
    Watch("admin, domain research, group g2", RESEARCH_ADMIN, group="g2"),
    Watch("user u1 (both of its keys)", USER1),
    Watch("user u2, group g1", USER2, group="g1"),
    Watch("user u1 via AKUSER1B, one session", USER1B, session=session_name(USER1B, 1)),
    Watch("user u2, a session born after the kill", USER2, session=session_name(USER2, 99)),
)


@dataclass
class Received:
    events: list[StreamEvent] = field(default_factory=list)

    @property
    def ids(self) -> list[str | None]:
        """The ids of the changes received (not a state's markers or its events)."""
        return [
            e.id
            for e in self.events
            if not (e.is_gap or e.is_state_begin or e.is_state_end or e.from_state)
        ]

    def latest(self) -> dict[tuple[str, str], str]:
        """What a client that applies the states and then the changes holds: the
        latest event's name per session (a state's begin starts over)."""
        held: dict[tuple[str, str], str] = {}
        for e in self.events:
            if e.is_state_begin:
                held = {}
            elif not (e.is_gap or e.is_state_end):
                held[(e.data["ownerAccessKey"], e.data["sessionId"])] = e.name
        return held

    @property
    def gaps(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.is_gap]


def describe_difference(got: Sequence[str | None], expected: Sequence[str]) -> str:
    counts = Counter(got)
    duplicates = sorted(str(i) for i, n in counts.items() if n > 1)
    missing = [i for i in expected if i not in counts]
    extra = sorted(str(i) for i in counts if i not in set(expected))
    return (
        f"received {len(got)}, expected {len(expected)}; "
        f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}; "
        f"duplicated {duplicates[:10]}; not allowed {extra[:10]}"
    )


# -- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_nginx() -> str:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(NGINX_INSTALL_HINT, pytrace=False)


def render_nginx_conf(listen: str, replicas: Sequence[str]) -> str:
    text = NGINX_CONF.read_text(encoding="utf-8")
    values = {"@LISTEN@": listen} | {f"@REPLICA_{i}@": r for i, r in enumerate(replicas, 1)}
    for placeholder, value in values.items():
        assert placeholder in text, f"{NGINX_CONF} has no {placeholder}"
        text = text.replace(placeholder, value)
    left = PLACEHOLDER_RE.findall(text)
    assert not left, f"unrendered placeholders in {NGINX_CONF}: {left}"
    return text


def proxy_toml(bind: str, upstream: str) -> str:
    lines = [
        "[server]",
        f'bind = "{bind}"',
        "heartbeat_interval = 1.0",
        "graceful_timeout = 1.0",
        "",
        "[upstream]",
        f'target = "{upstream}"',
        "reconnect_min = 0.05",
        "reconnect_max = 0.5",
    ]
    for key in ALL_KEYS:
        lines += [
            "",
            "[[keypairs]]",
            f'access_key = "{key.access_key}"',
            f'secret_key = "{key.secret_key}"',
            f'role = "{key.role}"',
            f'user_id = "{key.user_id}"',
            f'domain = "{key.domain}"',
        ]
    return "\n".join(lines) + "\n"


def append_lines(path: Path, lines: Sequence[dict[str, str]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))


@dataclass
class Spawned:
    name: str
    process: trio.Process
    log: Path


class Processes:
    """Real processes, each in its own session with output to a file; all ended at exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.spawned: list[Spawned] = []
        self._files: list[IO[bytes]] = []

    async def start(self, name: str, *argv: str) -> Spawned:
        log = self.directory / f"{name}.log"
        out = log.open("wb")
        self._files.append(out)
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=None,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        spawned = Spawned(name, process, log)
        self.spawned.append(spawned)
        return spawned

    async def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM everything still running (nginx's master takes its workers along)."""
        running = [s.process for s in self.spawned if s.process.returncode is None]
        for process in running:
            process.terminate()
        with trio.move_on_after(timeout):
            for process in running:
                await process.wait()
        self.kill_all()

    def kill_all(self) -> None:
        for s in self.spawned:
            if s.process.returncode is None:
                # Not reaped yet, so its pid (and process group id) is still its own:
                # the group takes any children along (nginx's workers).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(s.process.pid, signal.SIGKILL)
                s.process.kill()
        for f in self._files:
            f.close()
        self._files.clear()

    def output(self) -> str:
        parts = []
        for s in self.spawned:
            text = s.log.read_text(errors="replace") if s.log.exists() else ""
            parts.append(f"--- {s.name} (exit {s.process.returncode}) ---\n{text[-3000:]}")
        return "\n".join(parts)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.kill_all()  # normally already stopped by the test's own cleanup


async def read_log(spawned: Spawned) -> str:
    return await trio.Path(spawned.log).read_text(errors="replace")


async def wait_for_log(spawned: Spawned, pattern: str, timeout: float = 15.0) -> re.Match[str]:
    with trio.fail_after(timeout):
        while True:
            match = re.search(pattern, await read_log(spawned), re.MULTILINE)
            if match:
                return match
            if spawned.process.returncode is not None:
                raise AssertionError(f"{spawned.name} exited: {await read_log(spawned)}")
            await trio.sleep(0.02)


async def stream_opens(replica: Spawned) -> list[tuple[str, str]]:
    return STREAM_OPEN_RE.findall(await read_log(replica))


# -- the test -------------------------------------------------------------------------


@pytest.mark.parametrize("initial_state", [False, True], ids=["changes", "state"])
async def test_clients_fail_over_between_replicas_behind_nginx(
    tmp_path: Path, processes: Processes, initial_state: bool
) -> None:
    """A replica is killed mid-way; its clients land on the other one with their
    Last-Event-ID. With ``initial_state`` every client follows state (initialState):
    it never sees a gap, and what it holds at the end is the whole log's latest event
    per session that it may see."""
    nginx = find_nginx()
    sent = make_events(TOTAL_EVENTS)
    late = session_name(USER2, LATE_SESSION)
    kill_point = KILL_AFTER_BATCHES * BATCH
    for watch in WATCHES:
        if watch.session == late:  # nothing to see until after the kill
            assert not any(map(watch.may_see, sent[:kill_point])), watch.label
        else:
            assert any(watch.may_see(e) for e in sent[:BATCH]), watch.label
    for watch in WATCHES:
        if watch.key.role == "user":  # a user-role client sees only some events
            assert 0 < sum(map(watch.may_see, sent)) < len(sent), watch.label

    replay = tmp_path / "events.jsonl"
    replay.write_text("")
    upstream_addr = f"127.0.0.1:{free_port()}"
    replica_addrs = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    nginx_port = free_port()
    base_url = f"http://127.0.0.1:{nginx_port}"

    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(f"127.0.0.1:{nginx_port}", replica_addrs))
    checked = await trio.run_process(
        [nginx, "-t", "-p", str(prefix), "-c", str(conf)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr.decode()

    received = {watch: Received() for watch in WATCHES}
    try:
        with trio.fail_after(45):
            # -- start: upstream, two replicas, nginx ------------------------------
            upstream = await processes.start(
                "upstream",
                str(BIN),
                "upstream",
                "--listen",
                upstream_addr,
                "--replay",
                str(replay),
                "--follow",
            )
            log_id = (await wait_for_log(upstream, r"upstream serving on \S+ \(log (\S+)\)"))[1]
            replicas = []
            for n, addr in enumerate(replica_addrs):
                config = tmp_path / f"replica-{n}.toml"
                config.write_text(proxy_toml(addr, upstream_addr))
                replicas.append(
                    await processes.start(
                        f"replica-{n}", str(BIN), "serve", "--config", str(config)
                    )
                )
            await processes.start("nginx", nginx, "-p", str(prefix), "-c", str(conf))
            async with httpx.AsyncClient(timeout=5.0) as http:
                for addr in replica_addrs:
                    await wait_for_http(http, f"http://{addr}/readyz")  # upstream attached
                await wait_for_http(http, f"{base_url}/")

            expected = {
                watch: [f"{log_id}:{seq}" for seq, e in enumerate(sent, 1) if watch.may_see(e)]
                for watch in WATCHES
            }

            async def follow(watch: Watch) -> None:
                events = stream_events(
                    base_url,
                    Credentials(watch.key.access_key, watch.key.secret_key),
                    session=watch.session,
                    owner=watch.owner,
                    group=watch.group,
                    retry_delay=0.05,
                    max_retry_delay=0.5,
                    read_timeout=5.0,
                    initial_state=initial_state,
                )
                async with aclosing(events) as stream:
                    async for event in stream:
                        received[watch].events.append(event)

            async with trio.open_nursery() as clients:
                for watch in WATCHES:
                    clients.start_soon(follow, watch)
                # Everyone is subscribed (on one replica or the other) before any event.
                with trio.fail_after(10):
                    while sum([len(await stream_opens(r)) for r in replicas]) < len(WATCHES):
                        await trio.sleep(0.02)
                opened_before = [len(await stream_opens(r)) for r in replicas]

                # -- drive events; kill the replica serving the most clients mid-way -
                victim = survivor = None
                for b in range(0, TOTAL_EVENTS, BATCH):
                    append_lines(replay, sent[b : b + BATCH])
                    await trio.sleep(0.05)
                    if b // BATCH + 1 == KILL_AFTER_BATCHES:
                        # Every client but the late session's holds an event by now.
                        with trio.fail_after(10):
                            while not all(received[w].ids for w in WATCHES if w.session != late):
                                await trio.sleep(0.02)
                        pick = 0 if opened_before[0] >= opened_before[1] else 1
                        victim, survivor = replicas[pick], replicas[1 - pick]
                        victim.process.send_signal(signal.SIGKILL)
                        await victim.process.wait()
                assert victim is not None
                assert survivor is not None

                # -- wait for every client's last expected event, then a little more -
                # (on timeout, the checks below say what is missing)
                with trio.move_on_after(15):
                    while not all(
                        received[w].ids[-1:] == expected[w][-1:] or received[w].gaps
                        for w in WATCHES
                    ):
                        await trio.sleep(0.05)
                await trio.sleep(0.3)  # a duplicate or stray event would arrive now
                clients.cancel_scope.cancel()

            # -- how the clients moved -----------------------------------------------
            on_victim = opened_before[replicas.index(victim)]
            assert on_victim > 0, "the killed replica served no client"
            survivor_opens = await stream_opens(survivor)
            reconnects = survivor_opens[opened_before[replicas.index(survivor)] :]
            assert len(reconnects) >= on_victim, (
                f"{on_victim} client(s) were on the killed replica, but only "
                f"{len(reconnects)} stream(s) opened on the survivor afterwards"
            )
            assert all(resume != "None" for _, resume in reconnects), reconnects

            # -- every client got exactly what it may see -----------------------------
            failures = []
            for watch in WATCHES:
                got = received[watch]
                if got.gaps:
                    failures.append(f"{watch.label}: stream_gap {got.gaps}")
                elif initial_state:
                    reference: dict[tuple[str, str], str] = {}
                    for e in sent:
                        if watch.may_see(e):
                            reference[(e["ownerAccessKey"], e["sessionId"])] = e["name"]
                    if not reference:
                        failures.append(f"{watch.label}: the test expects nothing of it")
                    elif not got.events or not got.events[0].is_state_begin:
                        failures.append(f"{watch.label}: no state first")
                    elif got.latest() != reference:
                        failures.append(f"{watch.label}: holds {got.latest()}, not {reference}")
                elif got.ids != expected[watch]:
                    difference = describe_difference(got.ids, expected[watch])
                    failures.append(f"{watch.label}: {difference}")
            assert not failures, "\n".join(failures)
    except BaseException:
        print(processes.output())  # shown by pytest when the test fails
        raise
    finally:
        with trio.CancelScope(shield=True):
            await processes.stop_all()
