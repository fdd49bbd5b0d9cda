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

import grpc
import pytest
import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy._pb.kernel_events.v1 import events_pb2_grpc as pb_grpc
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest
from ..helpers import USER1, USER2, lifecycle, wait_until

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
