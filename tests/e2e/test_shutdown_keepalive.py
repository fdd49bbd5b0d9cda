"""Graceful shutdown of a real process, and a dead upstream link found by keepalive."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import trio

from proxy.config import UpstreamSettings
from proxy.hub import Hub
from proxy.upstream import UpstreamBridge
from proxy.upstream_server import UpstreamServer

from ..helpers import (
    ALL_KEYS,
    EVENTS_PATH,
    SUPER,
    USER1,
    signed_headers,
    wait_for_http,
    wait_until,
)
from .test_cli import free_port

BIN = Path(sys.executable).parent / "kernel-events-proxy"


def config_file(tmp_path: Path, bind: str, target: str) -> Path:
    lines = [
        "[server]",
        f'bind = "{bind}"',
        "graceful_timeout = 3.0",
        "[upstream]",
        f'target = "{target}"',
    ]
    for k in ALL_KEYS:
        lines += [
            "[[keypairs]]",
            f'access_key = "{k.access_key}"',
            f'secret_key = "{k.secret_key}"',
            f'role = "{k.role}"',
            f'user_id = "{k.user_id}"',
            f'domain = "{k.domain}"',
        ]
    path = tmp_path / "proxy.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_sigterm_sends_server_close_to_every_client_and_exits_0(
    tmp_path: Path, upstream: UpstreamServer
) -> None:
    bind = f"127.0.0.1:{free_port()}"
    proc = await trio.lowlevel.open_process(
        [str(BIN), "serve", "--config", str(config_file(tmp_path, bind, upstream.target))],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://{bind}"
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
            await wait_for_http(client, f"{url}/readyz")
            endings: list[bytes] = []

            async def listen(key: object) -> None:
                target = f"{url}{EVENTS_PATH}"
                headers = signed_headers(target, key)  # type: ignore[arg-type]
                async with client.stream("GET", target, headers=headers) as response:
                    body = b""
                    async for chunk in response.aiter_raw():
                        body += chunk
                    endings.append(body)  # the stream ended cleanly

            async with trio.open_nursery() as nursery:
                for key in (SUPER, USER1):
                    nursery.start_soon(listen, key)
                await trio.sleep(0.5)
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    code = await proc.wait()
            assert code == 0
            assert time.monotonic() - started < 3.0 + 2.0  # within the grace period
            assert endings == [b'event: server_close\ndata: {"reason": "server-shutdown"}\n\n'] * 2
            # It no longer accepts connections.
            try:
                await client.get(f"{url}/")
            except httpx.ConnectError:
                pass
            else:
                raise AssertionError("the proxy still answers after shutdown")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


class FreezableRelay:
    """A TCP relay; ``freeze()`` silently stops every existing connection (a dead path)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.generation = 0
        self.port = 0

    def freeze(self) -> None:
        self.generation += 1

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        generation = self.generation
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                while data := await src.receive_some(65536):
                    if generation != self.generation:
                        await trio.sleep_forever()  # swallow everything, say nothing
                    await dst.send_all(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)


async def test_keepalive_notices_a_dead_upstream_link_in_seconds(
    upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    relay = FreezableRelay(upstream.port)
    port = await nursery.start(relay.run)
    hub = Hub(history_size=10, outbox_limit=10)
    bridge = UpstreamBridge(
        UpstreamSettings(
            target=f"127.0.0.1:{port}",
            keepalive_time=1.0,
            keepalive_timeout=1.0,
            reconnect_min=0.05,
            reconnect_max=0.2,
        ),
        hub,
    )
    nursery.start_soon(bridge.run)
    await wait_until(lambda: bridge.live)
    connects = bridge.connects
    relay.freeze()  # no FIN, no RST: only keepalive can tell
    started = time.monotonic()
    await wait_until(lambda: bridge.connects > connects, timeout=15)
    noticed = time.monotonic() - started
    await wait_until(lambda: bridge.live)
    assert noticed < 8.0, f"a dead link took {noticed:.1f}s to notice"
    print(f"dead upstream link noticed after {noticed:.1f}s (keepalive 1s + 1s)")
