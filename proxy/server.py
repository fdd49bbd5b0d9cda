"""Process wiring: one hub, one upstream bridge, one hypercorn server, one nursery.

``run_proxy`` owns everything it starts. Shutdown: stop accepting, send
``server_close`` to every client, give them ``graceful_timeout`` to read it, then
cancel the upstream subscription (which reaches ``call.cancel()``).

As a worker of a group (supervisor.py), the same process serves the listening sockets
its supervisor made and passed down, asks the group for limits, metrics and health
(group.py), and shuts down when the supervisor goes away.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer
from prometheus_client import make_asgi_app

from . import direct
from .app import create_app
from .config import ConfigError, Settings, load_keypairs_file
from .errors import error_body
from .group import WorkerGroup, metrics_asgi
from .hub import Hub
from .keys import KeyStore
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .pacing import Pacer
from .upstream import UpstreamBridge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningProxy:
    url: str
    hub: Hub
    bridge: UpstreamBridge
    _stop: trio.Event
    reload_keys: Callable[[], None]  # re-read the keypairs file now (SIGHUP)
    keys: KeyStore
    metrics_url: str | None = None  # when metrics have a bind of their own
    endings: Pacer | None = None  # connection endings taken in turn (pacing.py)

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

    def __init__(self) -> None:
        super().__init__()
        # Connection endings, taken in turn (pacing.py); passes everyone at once unless
        # its runner runs (run_proxy starts it).
        self.endings = Pacer(ENDINGS_PER_BATCH)

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.write_timeout * 1000)
                )
        return sockets


# How many connections may start ending per scheduler batch. Each end is about six
# steps of 25 us here, so a batch of 64 endings in progress is about 10 ms.
ENDINGS_PER_BATCH = 64

# How long closing a connection may take (a TLS close_notify to a peer that stopped
# reading); then the socket is closed without it.
CLOSE_TIMEOUT = 2.0


def _close_even_when_cancelled() -> None:
    """Make hypercorn close a connection's socket even from a cancelled task.

    Hypercorn's trio ``TCPServer._close`` (``send_eof``, then ``aclose``) runs in the
    task that finished the response. When that is a request whose body had not fully
    arrived (a 408 for a trickled body, a 400 for an oversized one), quart-trio is
    cancelling that task, so ``send_eof``'s checkpoint raises ``Cancelled``, the socket
    is never closed, and, the idle timer being stopped, the connection stays open for as
    long as the client likes (hypercorn issue #106). Shielded, with a deadline, it
    always completes; trio's ``SSLStream.aclose`` closes the socket even if its
    close_notify is cut short.
    """
    original = TCPServer._close
    if getattr(original, "_kep_shielded", False):
        return

    async def _close(self: TCPServer) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            if direct.client_left(self) and isinstance(self.stream, trio.SocketStream):
                # The client closed its side: a FIN of ours (send_eof) before closing
                # is a system call for nobody; closing sends it anyway.
                await self.stream.aclose()
                return
            await original(self)

    _close._kep_shielded = True  # type: ignore[attr-defined]
    TCPServer._close = _close  # type: ignore[method-assign]


_close_even_when_cancelled()


# What the HTTP layer refuses before any route sees it, in the API's JSON error shape.
_FRAMING_ERRORS: dict[int, tuple[str, str]] = {
    400: ("bad-request", "the request is not valid HTTP/1.1"),
    431: (
        "headers-too-large",
        "the request head is larger than this server accepts (limits.max_header_bytes)",
    ),
}


def _json_framing_errors() -> None:
    """Answer malformed HTTP/1.1 (h11's ``RemoteProtocolError``) with a JSON body.

    Hypercorn answers a request h11 cannot parse (a bad request line, a header without
    a colon, a head past ``h11_max_incomplete_size``) with an empty 400/431. Every
    other refusal of this API carries ``{status, error, title, detail}``; so do these.
    The connection is closed afterwards, as before.
    """
    original = H11Protocol._send_error_response
    if getattr(original, "_kep_json", False):
        return

    async def _send_error_response(self: H11Protocol, status_code: int) -> None:
        error, detail = _FRAMING_ERRORS.get(
            status_code, ("bad-request", "the request could not be parsed")
        )
        body = error_body(status_code, error, detail).encode()
        await self._send_h11_event(
            h11.Response(
                status_code=status_code,
                headers=[
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *self.config.response_headers("h11"),
                ],
            )
        )
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    _send_error_response._kep_json = True  # type: ignore[attr-defined]
    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]


_json_framing_errors()
direct.install()


def hypercorn_config(settings: Settings, inherited: list[int] | None = None) -> _Config:
    """``inherited``: listening sockets' descriptors to serve instead of binding (a
    group's worker; its supervisor made them with this same config)."""
    config = _Config()
    config.write_timeout = settings.server.write_timeout
    config.bind = [f"fd://{fd}" for fd in inherited] if inherited else [settings.server.bind]
    config.graceful_timeout = settings.server.graceful_timeout
    # Reconnect storms (a replica died, its clients arrive at once) overflow a short
    # accept queue into connection resets.
    config.backlog = 4096
    # Slowloris and friends (limits.py covers what the app checks itself):
    # - keep_alive_timeout closes a connection with no request in progress, counted
    #   from accept or the end of the previous request; a request head still arriving
    #   byte by byte is "no request" yet, so it is cut off too.
    # - a request head beyond the app's own size limits (which answer 414/431 in JSON)
    #   plus a margin is refused by the HTTP layer before any of it is buffered further.
    # - read_timeout stays unset: an event-stream client never sends anything after its
    #   request, and hypercorn would close every quiet stream. Dead stream clients are
    #   found by the kernel write timeout (TCP_USER_TIMEOUT) and heartbeats instead.
    limits = settings.limits
    config.keep_alive_timeout = limits.idle_timeout
    config.ssl_handshake_timeout = limits.handshake_timeout
    config.h11_max_incomplete_size = limits.max_header_bytes + limits.max_query_length + 8192
    config.h2_max_header_list_size = limits.max_header_bytes + limits.max_query_length + 8192
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    if settings.server.certfile is not None and settings.server.keyfile is not None:
        # TLS; ALPN then offers h2 first, so browsers multiplex streams on one
        # connection instead of hitting their six-connections-per-host limit.
        config.certfile = str(settings.server.certfile)
        config.keyfile = str(settings.server.keyfile)
    return config


async def run_proxy(
    settings: Settings,
    *,
    group: WorkerGroup | None = None,
    task_status: trio.TaskStatus[RunningProxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until shut down; ``group``: as one worker of a group (supervisor.py)."""
    hub = Hub(history_size=settings.server.history_size, outbox_limit=settings.server.outbox_limit)
    bridge = UpstreamBridge(settings.upstream, hub, state=settings.state)
    metrics = Metrics(hub, bridge)
    keys = KeyStore(settings.keypair_index())
    app = create_app(settings, hub, bridge, metrics, keys, shared=group)
    stop = trio.Event()
    reload_requests = trio.Event()

    async def shutdown_trigger() -> None:
        await stop.wait()
        log.info("shutting down: closing %d client stream(s)", hub.clients)
        hub.close()

    async with trio.open_nursery() as nursery:
        config = hypercorn_config(settings, group.listen if group else None)

        async def serve_then_stop(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()

        nursery.start_soon(config.endings.run)
        nursery.start_soon(bridge.run)
        nursery.start_soon(hub.run_heartbeats, settings.server.heartbeat_interval)
        if group is not None:
            nursery.start_soon(_follow_supervisor, group, bridge, metrics, stop)
        if settings.auth.keypairs_file is not None:
            nursery.start_soon(_watch_keypairs, settings, keys, hub, lambda: reload_requests)
        binds: list[str] = await nursery.start(partial(serve_then_stop))
        metrics_url = None
        if settings.server.metrics_bind is not None:
            if group is None:
                metrics_config = hypercorn_config(settings)
                metrics_config.bind = [settings.server.metrics_bind]
                metrics_app = make_asgi_app(metrics.registry)
            else:
                metrics_config = hypercorn_config(settings, group.metrics_listen)
                metrics_app = metrics_asgi(group.metrics, METRICS_CONTENT_TYPE)
            metrics_binds: list[str] = await nursery.start(
                partial(
                    serve,
                    metrics_app,
                    metrics_config,
                    shutdown_trigger=stop.wait,
                )
            )
            metrics_url = f"{metrics_binds[0]}/metrics"

        def request_reload() -> None:
            nonlocal reload_requests
            reload_requests.set()
            reload_requests = trio.Event()

        task_status.started(
            RunningProxy(
                binds[0], hub, bridge, stop, request_reload, keys, metrics_url, config.endings
            )
        )


async def _follow_supervisor(
    group: WorkerGroup, bridge: UpstreamBridge, metrics: Metrics, stop: trio.Event
) -> None:
    """Answer the supervisor's questions; when it is gone, this worker shuts down too."""
    await group.run(lambda: {"live": bridge.live, "metrics": metrics.snapshot()})
    if not stop.is_set():
        log.warning("the supervisor is gone: shutting down")
        stop.set()


KEYPAIRS_POLL = 1.0


async def _watch_keypairs(
    settings: Settings, keys: KeyStore, hub: Hub, reload_requested: Callable[[], trio.Event]
) -> None:
    """Re-read the keypairs file on request (SIGHUP) or when it changes on disk."""
    path = settings.auth.keypairs_file
    assert path is not None
    inline = {kp.access_key for kp in settings.keypairs} - {
        kp.access_key for kp in load_keypairs_file(path)
    }
    last = _mtime(path)
    while True:
        # The request being waited for: a request replaces it with a fresh event, so
        # asking for the current one after waking would miss it (a SIGHUP with the file's
        # mtime unchanged did nothing).
        requested = reload_requested()
        with trio.move_on_after(KEYPAIRS_POLL):
            await requested.wait()
        current = _mtime(path)
        if current == last and not requested.is_set():
            continue
        last = current
        try:
            extra = load_keypairs_file(path)
        except ConfigError as exc:
            log.error("keypairs not reloaded, keeping the current ones: %s", exc)
            continue
        fresh = {k: v for k, v in settings.keypair_index().items() if k in inline}
        clashes = sorted(fresh.keys() & {kp.access_key for kp in extra})
        if clashes:
            log.error("keypairs not reloaded: %s also configured inline", ", ".join(clashes))
            continue
        fresh.update((kp.access_key, kp.to_keypair()) for kp in extra)
        revoked = keys.replace(fresh)
        closed = hub.revoke(revoked)
        log.info(
            "keypairs reloaded from %s: %d key(s), %d revoked or changed, %d stream(s) closed",
            path,
            len(fresh),
            len(revoked),
            closed,
        )


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns / 1e9
    except OSError:
        return None
