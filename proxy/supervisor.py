"""``serve --workers N``: one supervisor and N worker processes on the same sockets.

The supervisor does the nginx master's job and serves no client itself:

- it creates the listening sockets once, with the proxy's hypercorn config (socket
  options, backlog), and holds them for the group's whole life; every worker inherits
  them and accepts from the same queue (why not ``SO_REUSEPORT``: ARCHITECTURE.md);
- it starts each worker as a fresh interpreter (``python -m proxy.worker``: an exec,
  never a fork, so each worker creates its own gRPC channels), with nothing secret on
  its command line: the settings go down the worker's control socket;
- it starts a worker that died again after a backoff, while the others keep serving;
- SIGTERM/SIGINT: every worker gets SIGTERM (each tells its clients ``server_close``),
  the group exits when they have; SIGHUP: every worker reloads its keypairs;
- it keeps what the group shares (group.py): the abuse-limit ledger, which it alone
  decides, the counters of workers that died, and the group's metrics, health and
  readiness, gathered from every worker when one of them is asked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio
from hypercorn.utils import repr_socket_addr

from .config import SESSION_MODE_TEXT, Settings, session_mode
from .group import Link, LinkClosed, Message, ledger_for
from .limits import StreamLimitExceeded
from .metrics import Snapshot, group_view, merge, monotonic, render
from .server import hypercorn_config

log = logging.getLogger(__name__)

# A worker that dies is started again after RESTART_MIN, doubling up to RESTART_MAX
# while it keeps dying; one that had lived RESTART_RESET seconds starts afresh.
RESTART_MIN: Final = 0.1
RESTART_MAX: Final = 10.0
RESTART_RESET: Final = 30.0
# A worker that does not answer a report this fast counts as not live (readiness).
REPORT_TIMEOUT: Final = 2.0
# At shutdown a worker gets graceful_timeout, plus this for the rest of its exit.
EXIT_MARGIN: Final = 3.0


class CannotListen(Exception):
    """A listening socket could not be made (the message names the setting)."""


def cores_allowed(cores: int, cpu_max: str | None) -> int:
    """The cores a process may use: those it may run on, capped by a cgroup v2 quota
    (``cpu.max``: "max 100000" is none, "150000 100000" one and a half, so 2)."""
    if cpu_max:
        quota, _, period = cpu_max.strip().partition(" ")
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            cores = min(cores, math.ceil(int(quota) / int(period)))
    return max(1, cores)


def available_cores() -> int:
    """``server.workers = "auto"``: this process's CPU affinity and its cgroup's quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        cpu_max: str | None = Path("/sys/fs/cgroup/cpu.max").read_text()
    except OSError:
        cpu_max = None
    return cores_allowed(cores, cpu_max)


def generate_shared_keys(sources: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """``sources`` with what a process would make for itself at start-up made once,
    for every worker: a session key when none is configured, so a cookie signed by one
    worker is good on all of them (the demo's keypairs are in ``sources`` already)."""
    out = dict(sources)
    if session_mode(settings.session) == "generated":
        out["session"] = {**out.get("session", {}), "secret_key": secrets.token_urlsafe(32)}
        log.warning(
            "browser sign-in: %s; made once for every worker of this group",
            SESSION_MODE_TEXT["generated"],
        )
    return out


@dataclass
class _Worker:
    index: int
    process: trio.Process | None = None
    link: Link | None = None
    ready: bool = False  # serving (it said so), and it gets signals
    exited: trio.Event = field(default_factory=trio.Event)
    metrics: Snapshot = field(default_factory=list)  # its last report


class Supervisor:
    """The group: its sockets, its workers, its shared ledger (module docstring)."""

    def __init__(
        self,
        sources: Mapping[str, Any],
        settings: Settings,
        workers: int,
        *,
        log_level: str = "INFO",
        log_format: str = "text",
    ) -> None:
        self._settings = settings
        self._listen, self._metrics_listen = self._create_sockets()
        # Plain JSON (paths as strings), as each worker validates it again.
        shared = generate_shared_keys(sources, settings)
        self._sources = json.loads(json.dumps(shared, default=str))
        self._workers = [_Worker(i) for i in range(1, workers + 1)]
        self._log = ["--log-level", log_level, "--log-format", log_format]
        self.ledger = ledger_for(settings.limits)
        self.restarts = 0
        self._retired: Snapshot = []  # what dead workers counted
        self._stop = trio.Event()
        self._all_ready = trio.Event()
        self._exit_code = 0
        scheme = "https" if settings.server.certfile is not None else "http"
        first = self._listen[0]
        self.url = f"{scheme}://{repr_socket_addr(first.family, first.getsockname())}"

    def _create_sockets(self) -> tuple[list[socket.socket], list[socket.socket]]:
        server = self._settings.server
        config = hypercorn_config(self._settings)
        binds = [("server.bind", server.bind, config)]
        if server.metrics_bind is not None:
            metrics_config = hypercorn_config(self._settings)
            metrics_config.bind = [server.metrics_bind]
            binds.append(("server.metrics_bind", server.metrics_bind, metrics_config))
        made: list[list[socket.socket]] = []
        for key, bind, cfg in binds:
            try:
                sockets = cfg.create_sockets()
                listening = [*sockets.secure_sockets, *sockets.insecure_sockets]
                for sock in listening:
                    sock.listen(cfg.backlog)
            except OSError as exc:
                for sock in (s for group in made for s in group):
                    sock.close()
                raise CannotListen(f"{key}: cannot listen on {bind}: {exc.strerror}") from None
            made.append(listening)
        return made[0], made[1] if len(made) > 1 else []

    async def run(self, on_serving: Callable[[str], None]) -> int:
        """Serve until SIGTERM/SIGINT (or a worker failing before the group started);
        the exit status: 0 when every worker shut down cleanly."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_signals, signals)
                for worker in self._workers:
                    nursery.start_soon(self._keep_running, worker)
                await _first(self._all_ready.wait, self._stop.wait)
                if not self._stop.is_set():
                    on_serving(self.url)
                await self._stop.wait()
                await self._shutdown()
                nursery.cancel_scope.cancel()
        return self._exit_code

    # -- processes -----------------------------------------------------------------

    async def _keep_running(self, worker: _Worker) -> None:
        delay = RESTART_MIN
        while not self._stop.is_set():
            started = trio.current_time()
            code = await self._run_worker(worker)
            served, worker.ready = worker.ready, False
            if self._stop.is_set():
                if code != 0 and served:
                    log.error("worker %d exited with %s at shutdown", worker.index, _status(code))
                    self._exit_code = self._exit_code or 1
                return
            given_back = self.ledger.forget(worker.index)
            self._retired = merge([self._retired, monotonic(worker.metrics)])
            worker.metrics = []
            if not self._all_ready.is_set() and not served:
                log.error(
                    "worker %d exited with %s before it was serving: stopping",
                    worker.index,
                    _status(code),
                )
                self._exit_code = code if code > 0 else 1
                self._stop.set()
                return
            if trio.current_time() - started >= RESTART_RESET:
                delay = RESTART_MIN
            log.warning(
                "worker %d exited with %s (%d stream slot(s) given back); starting it again "
                "in %.1f s",
                worker.index,
                _status(code),
                given_back,
                delay,
            )
            with trio.move_on_after(delay):
                await self._stop.wait()
            delay = min(delay * 2, RESTART_MAX)
            if not self._stop.is_set():
                self.restarts += 1

    async def _run_worker(self, worker: _Worker) -> int:
        """Start the worker, serve its link until it exits; its exit status."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inherited = [s.fileno() for s in (*self._listen, *self._metrics_listen)]
        argv = [sys.executable, "-m", "proxy.worker", "--index", str(worker.index)]
        argv += ["--control-fd", str(child.fileno()), *self._log]
        worker.exited = trio.Event()
        try:
            try:
                process = await trio.lowlevel.open_process(
                    argv,
                    pass_fds=(child.fileno(), *inherited),
                    stdin=subprocess.DEVNULL,
                    # Not in the terminal's process group: a Ctrl-C reaches the
                    # supervisor alone, which shuts the workers down in order.
                    process_group=0,
                )
            finally:
                child.close()
        except OSError as exc:
            parent.close()
            worker.exited.set()
            log.error("worker %d could not be started: %s", worker.index, exc)
            return 1
        link = Link(trio.SocketStream(trio.socket.from_stdlib_socket(parent)))
        worker.process, worker.link = process, link
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        link.post(
            {
                "op": "start",
                "workers": len(self._workers),
                "settings": self._sources,
                "listen": [s.fileno() for s in self._listen],
                "metrics_listen": [s.fileno() for s in self._metrics_listen],
            }
        )
        if self._stop.is_set():
            process.send_signal(signal.SIGTERM)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run, partial(self._handle, worker, link))
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            worker.process = worker.link = None
            worker.exited.set()
        return code

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                serving = self._serving()
                log.info("received SIGHUP: reloading keypairs in %d worker(s)", len(serving))
                for worker in serving:
                    # Only workers that are serving: a starting one has its signal handlers
                    # yet to install (SIGHUP would kill it), and reads the file anyway.
                    _signal(worker, signal.SIGHUP)
                continue
            if not self._stop.is_set():
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self._stop.set()

    async def _shutdown(self) -> None:
        # New connections are refused once the workers close their copies too.
        for sock in (*self._listen, *self._metrics_listen):
            sock.close()
        for worker in self._workers:
            _signal(worker, signal.SIGTERM)
        with trio.move_on_after(self._settings.server.graceful_timeout + EXIT_MARGIN):
            for worker in self._workers:
                await worker.exited.wait()
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                log.error("worker %d did not exit in time: killed", worker.index)
                worker.process.kill()
                self._exit_code = self._exit_code or 1
        with trio.move_on_after(EXIT_MARGIN):
            for worker in self._workers:
                await worker.exited.wait()

    def _serving(self) -> list[_Worker]:
        return [w for w in self._workers if w.ready and w.link is not None]

    # -- what the workers ask --------------------------------------------------------

    def _handle(self, worker: _Worker, link: Link, message: Message) -> Message | None:
        try:
            return self._answer(worker, link, message)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("worker %d sent a bad %r message: %r", worker.index, message.get("op"), exc)
            return None

    def _answer(self, worker: _Worker, link: Link, message: Message) -> Message | None:
        op = message.get("op")
        if op == "acquire":
            try:
                self.ledger.acquire(str(message["key"]), worker.index)
            except StreamLimitExceeded as exc:
                return {"refused": {"status": exc.status, "error": exc.error, "detail": exc.detail}}
            return {"ok": True}
        if op == "release":
            self.ledger.release(str(message["key"]), worker.index)
        elif op == "login_attempt":
            return {"wait": self.ledger.login_attempt(str(message["address"]))}
        elif op == "login_wait":
            return {"wait": self.ledger.login_wait(str(message["key"]))}
        elif op == "login_failed":
            self.ledger.login_failed(str(message["key"]))
        elif op == "ready":
            worker.ready = True
            log.info("worker %d serving", worker.index)
            if all(w.ready for w in self._workers):
                self._all_ready.set()
        elif op == "health":
            return {"workers": self._counts()}
        elif op in ("metrics", "readiness"):
            self._nursery.start_soon(self._answer_group, link, message)
        else:
            log.warning("worker %d sent an unknown message %r", worker.index, op)
        return None

    def _counts(self, live: int | None = None) -> dict[str, int]:
        counts = {"configured": len(self._workers), "running": len(self._serving())}
        if live is not None:
            counts["upstream_live"] = live
        return counts

    async def _answer_group(self, link: Link, message: Message) -> None:
        """Metrics or readiness for the whole group: every serving worker reports."""
        serving = self._serving()
        live = 0

        async def ask(worker: _Worker) -> None:
            nonlocal live
            assert worker.link is not None
            with trio.move_on_after(REPORT_TIMEOUT), contextlib.suppress(LinkClosed):
                report = await worker.link.request({"op": "report"})
                worker.metrics = report["metrics"]
                live += bool(report["live"])

        async with trio.open_nursery() as nursery:
            for worker in serving:
                nursery.start_soon(ask, worker)
        if message["op"] == "metrics":
            families = group_view(
                self._retired,
                (w.metrics for w in self._workers),
                len(self._workers),
                len(serving),
                self.restarts,
            )
            link.reply(message, {"text": render(families).decode()})
        else:
            everywhere = bool(serving) and live == len(serving)
            link.reply(message, {"live": everywhere, "workers": self._counts(live)})


def _signal(worker: _Worker, signum: int) -> None:
    if worker.process is not None and worker.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signum)


def _status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"


async def _first(*waits: Callable[[], Any]) -> None:
    """Return when the first of ``waits`` does."""
    async with trio.open_nursery() as nursery:
        for wait in waits:

            async def one(wait: Callable[[], Any] = wait) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(one)
