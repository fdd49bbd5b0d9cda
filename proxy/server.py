"""Process wiring: one hub, one upstream bridge, one hypercorn server, one nursery.

``run_proxy`` owns everything it starts. Shutdown: stop accepting, send
``server_close`` to every client, give them ``graceful_timeout`` to read it, then
cancel the upstream subscription (which reaches ``call.cancel()``).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve
from prometheus_client import make_asgi_app

from .app import create_app
from .config import Settings
from .hub import Hub
from .metrics import Metrics
from .upstream import UpstreamBridge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningProxy:
    url: str
    hub: Hub
    bridge: UpstreamBridge
    _stop: trio.Event
    metrics_url: str | None = None  # when metrics have a bind of their own

    def shutdown(self) -> None:
        self._stop.set()


class _Config(HypercornConfig):
    """Hypercorn's config, with a kernel-enforced write timeout on every connection.

    Hypercorn writes with cancellation shielded, so a client that stops reading (or a
    half-open connection whose peer vanished) would block its write, and the
    connection, forever; nothing in Trio can interrupt it. ``TCP_USER_TIMEOUT`` on
    the listening socket (inherited by accepted ones) makes the kernel abort a
    connection whose sent data stays unacknowledged, zero-window probes included,
    for that long; the blocked write then fails and the connection closes.
    """

    write_timeout = 30.0

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.write_timeout * 1000)
                )
        return sockets


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = _Config()
    config.write_timeout = settings.server.write_timeout
    config.bind = [settings.server.bind]
    config.graceful_timeout = settings.server.graceful_timeout
    # Reconnect storms (a replica died, its clients arrive at once) overflow a short
    # accept queue into connection resets.
    config.backlog = 4096
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


async def run_proxy(
    settings: Settings, *, task_status: trio.TaskStatus[RunningProxy] = trio.TASK_STATUS_IGNORED
) -> None:
    hub = Hub(history_size=settings.server.history_size, outbox_limit=settings.server.outbox_limit)
    bridge = UpstreamBridge(settings.upstream, hub)
    metrics = Metrics(hub, bridge)
    app = create_app(settings, hub, bridge, metrics)
    stop = trio.Event()

    async def shutdown_trigger() -> None:
        await stop.wait()
        log.info("shutting down: closing %d client stream(s)", hub.clients)
        hub.close()

    async with trio.open_nursery() as nursery:

        async def serve_then_stop(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(
                app,
                hypercorn_config(settings),
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )
            nursery.cancel_scope.cancel()

        nursery.start_soon(bridge.run)
        binds: list[str] = await nursery.start(partial(serve_then_stop))
        metrics_url = None
        if settings.server.metrics_bind is not None:
            metrics_config = hypercorn_config(settings)
            metrics_config.bind = [settings.server.metrics_bind]
            metrics_binds: list[str] = await nursery.start(
                partial(
                    serve,
                    make_asgi_app(metrics.registry),
                    metrics_config,
                    shutdown_trigger=stop.wait,
                )
            )
            metrics_url = f"{metrics_binds[0]}/metrics"
        task_status.started(RunningProxy(binds[0], hub, bridge, stop, metrics_url))
