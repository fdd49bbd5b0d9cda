"""The command line as a user runs it: real processes, real sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy._pb.kernel_events.v1 import events_pb2_grpc as pb_grpc
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest
from ..helpers import ADMIN, USER1, USER2, Key, lifecycle, wait_until

BIN = Path(sys.executable).parent / "kernel-events-proxy"


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def read_until(stream: object, pattern: str, limit: int = 200) -> re.Match[str]:
    assert hasattr(stream, "readline")
    seen = []
    for _ in range(limit):
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"{pattern!r} not found in:\n{''.join(seen)}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_banner_command_shows_live_events(processes: list[subprocess.Popen[str]]) -> None:
    demo = start("serve", "--demo", "--bind", "127.0.0.1:0", "--demo-rate", "50")
    processes.append(demo)
    command = read_until(demo.stdout, r"^\s+(BACKEND_ACCESS_KEY=\S+ .* tail --url \S+)$").group(1)
    # Pasted into a shell, as the banner says.
    result = subprocess.run(
        ["bash", "-c", f"{command} --json --count 5"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 5
    assert all(line["event"].startswith(("kernel_", "session_")) for line in lines)
    assert all(line["id"] for line in lines)
    demo.send_signal(signal.SIGINT)
    assert demo.wait(15) == 0


def test_config_error_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[server]\nbnd = "127.0.0.1:1"\n')
    result = subprocess.run(
        [str(BIN), "serve", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "server.bnd: unknown key" in result.stderr


def test_serve_without_keypairs_refuses_to_start() -> None:
    result = subprocess.run([str(BIN), "serve"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "no [[keypairs]]" in result.stderr


def test_upstream_replays_a_file_skips_bad_lines_and_follows(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"name": "kernel_preparing", "sessionId": "s1", "ownerAccessKey": "AK1", '
        '"userId": "u1", "domainName": "default", "groupName": "g1", "reason": "scheduled"}\n'
        "this is not json\n"
        '{"name": "kernel_terminated", "sessionId": "s1", "ownerAccessKey": "AK1", '
        '"userId": "u1", "domainName": "default", "groupName": "g1", "result": "SUCCESS"}\n'
    )
    port = free_port()
    upstream = start(
        "upstream", "--listen", f"127.0.0.1:{port}", "--replay", str(events), "--follow"
    )
    processes.append(upstream)
    read_until(upstream.stdout, "upstream serving on")
    read_until(upstream.stderr, r"line 2: invalid JSON")

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.KernelEventsServiceStub(channel)
        call = stub.Subscribe(pb.SubscribeRequest(after_sequence=0, log_id="older"), timeout=20)
        got: list[pb.LifecycleEvent] = []
        appended = False
        for response in call:
            got.extend(response.events)
            if len(got) == 2 and not appended:
                with events.open("a") as f:
                    f.write(
                        '{"name": "kernel_cancelled", "sessionId": "s2", "ownerAccessKey": "AK1",'
                        ' "userId": "u1", "domainName": "default", "groupName": "g1"}\n'
                    )
                appended = True
            if len(got) == 3:
                break
    assert [(e.sequence, e.name, e.session_id) for e in got] == [
        (1, "kernel_preparing", "s1"),
        (2, "kernel_terminated", "s1"),
        (3, "kernel_cancelled", "s2"),
    ]
    assert got[1].result == pb.RESULT_SUCCESS
    upstream.terminate()
    assert upstream.wait(10) == 0


def test_upstream_rejects_follow_without_replay() -> None:
    result = subprocess.run(
        [str(BIN), "upstream", "--follow"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--follow needs --replay" in result.stderr


def test_config_check_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[server]\nbind = "127.0.0.1:9000"\n'
        '[[keypairs]]\naccess_key = "AK1"\nsecret_key = "do-not-print-me"\nuser_id = "u1"\n'
    )
    result = subprocess.run(
        [str(BIN), "config", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "KEP_UPSTREAM__TARGET": "127.0.0.1:7777"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["server"]["bind"] == "127.0.0.1:9000"
    assert effective["upstream"]["target"] == "127.0.0.1:7777"  # from the environment
    assert effective["keypairs"][0]["secret_key"] == "**********"
    assert "do-not-print-me" not in result.stdout + result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[upstream]\ntarget = "nowhere"\n')
    result = subprocess.run(
        [str(BIN), "config", "check", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "upstream.target" in result.stderr


@pytest.mark.parametrize(
    ("session", "expected"),
    [
        ("", "browser sign-in: on, cookies signed with a random key made at start-up"),
        (
            f'[session]\nsecret_key = "{"k" * 32}"\n',
            "browser sign-in: on, cookies signed with session.secret_key",
        ),
        ("[session]\nenabled = false\n", "browser sign-in: off (session.enabled = false)"),
    ],
)
def test_config_check_says_how_browser_sign_in_works(
    tmp_path: Path, session: str, expected: str
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[[keypairs]]\naccess_key = "AK1"\nsecret_key = "do-not-print-me"\nuser_id = "u1"\n'
        + session
    )
    result = subprocess.run(
        [str(BIN), "config", "check", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stderr
    assert "k" * 32 not in result.stdout + result.stderr


async def test_tail_against_a_running_proxy(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    env = {
        **os.environ,
        "BACKEND_ACCESS_KEY": USER1.access_key,
        "BACKEND_SECRET_KEY": USER1.secret_key,
    }
    done: list[subprocess.CompletedProcess[bytes]] = []

    async def tail() -> None:
        cmd = [str(BIN), "tail", "--url", proxy.url, "--json", "--count", "2", "--group", "g2"]
        done.append(await trio.run_process(cmd, env=env, capture_stdout=True, check=False))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tail)
        await wait_until(lambda: proxy.running.hub.clients == 1, timeout=20)
        upstream.log.append(
            [
                lifecycle("kernel_started", "a", USER1, group="g1"),
                lifecycle("kernel_started", "b", USER1, group="g2"),
                lifecycle("kernel_started", "c", USER2, group="g2"),
                lifecycle("kernel_terminated", "b", USER1, group="g2"),
            ]
        )
    (result,) = done
    assert result.returncode == 0
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [(line["event"], line["data"]["sessionId"]) for line in lines] == [
        ("kernel_started", "b"),
        ("kernel_terminated", "b"),
    ]


async def test_tail_exits_2_with_a_clear_message_on_auth_failure(proxy: ProxyUnderTest) -> None:
    env = {**os.environ, "BACKEND_ACCESS_KEY": USER1.access_key, "BACKEND_SECRET_KEY": "wrong-one"}
    result = await trio.run_process(
        [str(BIN), "tail", "--url", proxy.url],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    message = result.stderr.decode()
    assert "401" in message
    assert "Traceback" not in message


def test_demo_banner_shows_the_dashboard_and_its_login_works(
    processes: list[subprocess.Popen[str]],
) -> None:
    import httpx

    demo = start("serve", "--demo", "--bind", "127.0.0.1:0")
    processes.append(demo)
    url = read_until(demo.stdout, r"^Dashboard, in a browser: (\S+)/$").group(1)
    login = read_until(demo.stdout, r"access key (AKDEMOUSER1), secret key (\S+)$")
    page = httpx.get(f"{url}/", headers={"Accept": "text/html,*/*;q=0.8"}, timeout=10)
    assert page.headers["content-type"].startswith("text/html")
    response = httpx.post(
        f"{url}/server/login",
        json={"access_key": login.group(1), "secret_key": login.group(2)},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["role"] == "user"
    assert "kep_session=" in response.headers["set-cookie"]


def test_serving_processes_collect_garbage_less_often() -> None:
    """What start-up built is frozen out of collections, and the thresholds are raised
    (a storm of reconnects spent 40 % of its CPU in collections of held connections)."""
    import gc

    from proxy.cli import GC_THRESHOLDS, settle_garbage_collector

    before = gc.get_threshold()
    try:
        settle_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# --- wait and tail --state: real processes against a running proxy -------------------


def client_env(key: Key) -> dict[str, str]:
    return {
        **os.environ,
        "BACKEND_ACCESS_KEY": key.access_key,
        "BACKEND_SECRET_KEY": key.secret_key,
    }


async def run_cli(proxy: ProxyUnderTest, *args: str, key: Key = USER1) -> tuple[int, str, str]:
    result = await trio.run_process(
        [str(BIN), *args, "--url", proxy.url],
        env=client_env(key),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


UUID_S = "00000000-0000-4000-8000-0000000000a1"


async def test_wait_exits_0_for_an_event_reached_before_it_started(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    upstream.log.append(
        [
            lifecycle("session_scheduled", "job", USER1, session_uuid=UUID_S),
            lifecycle("kernel_started", "job", USER1, kernel_id="k1", session_uuid=UUID_S),
            lifecycle("session_started", "job", USER1, session_uuid=UUID_S),
        ]
    )
    await wait_until(lambda: proxy.running.hub.last_sequence == 3)
    code, out, err = await run_cli(proxy, "wait", "job", "--for", "session_started")
    assert (code, out, err) == (0, "job: session_started\n", "")
    # An earlier step of the way up is reached too; and by UUID, as an admin.
    code, out, _ = await run_cli(proxy, "wait", "job", "--for", "kernel_pulling")
    assert (code, out) == (0, "job: kernel_started (kernel k1)\n")
    code, out, _ = await run_cli(proxy, "wait", UUID_S, "--uuid", "--for", "session_started",
                                 key=ADMIN)  # fmt: skip
    assert (code, out) == (0, f"{UUID_S}: session_started\n")


async def test_wait_follows_until_the_event_comes(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    done: list[tuple[int, str, str]] = []

    async def wait() -> None:
        args = (
            "wait",
            "later",
            "--owner",
            USER1.access_key,
            "--for",
            "kernel_started,session_started",
        )
        done.append(await run_cli(proxy, *args, key=ADMIN))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await wait_until(lambda: proxy.running.hub.clients == 1, timeout=20)
        upstream.log.append(
            [
                lifecycle("kernel_started", "later", USER2),  # another owner's "later"
                lifecycle("kernel_pulling", "later", USER1),
                lifecycle("kernel_started", "later", USER1, reason="up"),
            ]
        )
    assert done == [(0, "later: kernel_started (reason=up)\n", "")]


@pytest.mark.parametrize(
    ("ending", "extra", "code", "says"),
    [
        ("session_failure", {"exit_code": 2, "reason": "task-failed"}, 3,
         "failed without reaching session_started: session_failure (reason=task-failed, "
         "exit code 2) [exit 3]"),
        ("session_cancelled", {"reason": "pending-timeout"}, 4,
         "was cancelled without reaching session_started: session_cancelled "
         "(reason=pending-timeout) [exit 4]"),
        ("session_terminated", {"reason": "user-requested"}, 5,
         "ended without reaching session_started: session_terminated "
         "(reason=user-requested) [exit 5]"),
    ],
)  # fmt: skip
async def test_wait_says_how_a_session_ended_otherwise(
    proxy: ProxyUnderTest,
    upstream: UpstreamServer,
    ending: str,
    extra: dict[str, Any],
    code: int,
    says: str,
) -> None:
    done: list[tuple[int, str, str]] = []

    async def wait() -> None:
        done.append(await run_cli(proxy, "wait", "doomed", "--for", "session_started"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        # Its state handed over (read from the upstream on demand): what follows is live.
        await wait_until(lambda: proxy.running.hub.state_writes == 1, timeout=20)
        upstream.log.append([lifecycle("session_scheduled", "doomed", USER1),
                             lifecycle(ending, "doomed", USER1, **extra)])  # fmt: skip
    ((got, out, err),) = done
    assert (got, out, err) == (code, "", f"wait: doomed {says}\n")
    # Already over when the next wait starts: it says so, from the state.
    got, _, err = await run_cli(proxy, "wait", "doomed", "--for", "session_started")
    assert got == code
    assert "doomed had already" in err


async def test_wait_times_out_with_124_and_refuses_bad_credentials_with_2(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    upstream.log.append([lifecycle("kernel_pulling", "slow", USER1, reason="img:1")])
    await wait_until(lambda: proxy.running.hub.last_sequence == 1)
    code, _, err = await run_cli(proxy, "wait", "slow", "--for", "kernel_started",
                                 "--timeout", "0.5")  # fmt: skip
    assert code == 124
    assert err == (
        "wait: timed out after 0.5 s waiting for slow to reach kernel_started; it is at "
        "kernel_pulling (reason=img:1)\n"
    )
    wrong = Key(USER1.access_key, "not-the-secret", "user", "u1", "default")
    code, _, err = await run_cli(proxy, "wait", "slow", "--for", "kernel_started", key=wrong)
    assert code == 2
    assert "401" in err
    assert "Traceback" not in err


async def test_tail_state_prints_the_state_then_follows(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    upstream.log.append(
        [
            lifecycle("kernel_started", "a", USER1),
            lifecycle("kernel_started", "b", USER2),
            lifecycle("kernel_terminated", "a", USER1, exit_code=0),
        ]
    )
    await wait_until(lambda: proxy.running.hub.last_sequence == 3)
    done: list[tuple[int, str, str]] = []

    async def tail() -> None:
        done.append(await run_cli(proxy, "tail", "--state", "--json", "--count", "4"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tail)
        await wait_until(lambda: proxy.running.hub.state_writes == 1, timeout=20)
        upstream.log.append([lifecycle("kernel_started", "c", USER1)])
    ((code, out, _),) = done
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    log_id = upstream.log.log_id
    assert [(line["event"], line["id"], line["data"].get("sessionId")) for line in lines] == [
        ("stream_state_begin", None, None),
        ("kernel_terminated", None, "a"),  # USER1 sees a, not USER2's b
        ("stream_state_end", f"{log_id}:3", None),
        ("kernel_started", f"{log_id}:4", "c"),
    ]
