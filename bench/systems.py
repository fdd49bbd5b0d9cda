"""The systems under test: how each is started, reached and measured.

1. ``proxy``: this project, ``kernel-events-proxy serve --config ...``, one process;
   ``proxy2``: the same with ``--workers 2`` (a supervisor and two workers).
2. ``aiohttp``: the original design on aiohttp + aiohttp-sse (``bench.peers``).
3. ``starlette``: sse-starlette on uvicorn, the same fan-out as 2.
4. ``nchan``: nginx + the nchan module, fed by ``bench.peers.nchan_bridge``.
5. ``grpc``: a bare grpcio client draining the upstream (the upstream hop's limit).
6. ``floor``: a bare send loop (``bench.peers.send_floor``): the fan-out latency floor.

Each system is started fresh per scenario and stopped after it. CPU time and RSS are
read from /proc for the system's own processes (for nchan: the nginx master, its
worker and the bridge), never for the load generators or the upstream.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .common import (
    EVENTS_PATH,
    HOST,
    SUPER_KEY,
    SUPER_SECRET,
    child_pids,
    cpu_seconds,
    rss_kib,
    user_id,
    user_key,
    user_secret,
)
from .procs import (
    Child,
    ChildError,
    free_port,
    listening_ports,
    wait_http,
    wait_listening,
    wait_port,
)

_SCRIPT: Final = Path(sys.executable).parent / "kernel-events-proxy"
# The installed entry point, or the same CLI as a module where it is not installed.
PROXY_CMD: Final = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "proxy.cli"]
NCHAN_MODULE: Final = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


@dataclass(frozen=True)
class Paths:
    """How clients reach a system: request paths (``{ak}``: a user's key) and auth."""

    port: int
    all_path: str
    user_path: str
    auth_all: str  # "none" | "super" | "user" (see bench.loadgen.build_request)
    auth_user: str


class System:
    key: str = ""
    label: str = ""
    auth: str = "none"
    filtering: str = ""
    scenarios: frozenset[str] = frozenset(
        {"ingest", "fanout", "selective", "connections", "churn", "storm"}
    )

    def __init__(self, work: Path, upstream: str) -> None:
        self.work = work
        self.upstream = upstream
        self.procs: list[Child] = []
        self.paths: Paths | None = None

    @classmethod
    def missing(cls) -> str | None:
        """Why this system cannot run here (a package is missing), or None."""
        return None

    def start(self, *, users: int, route: str) -> Paths:
        raise NotImplementedError

    def stop(self) -> None:
        for child in reversed(self.procs):
            child.stop()
        self.procs.clear()
        self.paths = None

    def pids(self) -> list[int]:
        return [c.pid for c in self.procs]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss(self) -> int:
        return sum(rss_kib(pid) for pid in self.pids())


BENCH_OUTBOX_LIMIT: Final = 65_536


def proxy_limits() -> dict[str, int]:
    """Raise this proxy's abuse limits (when it has them) above the benchmark's scale:
    thousands of streams share one access key here, and 10,001 are open at once."""
    from proxy.config import Settings

    if "limits" not in Settings.model_fields:
        return {}
    return {"max_streams": 1_000_000, "max_streams_per_key": 1_000_000}


class ProxySystem(System):
    key = "proxy"
    scenarios = System.scenarios | {"generations", "dashboard-storm"}
    label = "this proxy (quart-trio, hypercorn)"
    auth = "HMAC (signed once per connection)"
    filtering = "index + policy per matching client"
    workers = 1
    # Read the state at start-up and keep it ([state] idle_timeout = 0): the dashboard
    # storm measures a state held, and its RSS; by default the proxy reads it on demand.
    keep_state = False

    def start(self, *, users: int, route: str) -> Paths:
        config = self.work / f"{self.key}-{users}.toml"
        lines = [
            # outbox_limit: the default 4,096 frames is 27 ms of a 150,000 events/s
            # burst; on these two cores the one ingest reader is sometimes descheduled
            # longer than that and was dropped (stream_overflow) mid-measurement.
            f'[server]\nbind = "{HOST}:0"\noutbox_limit = {BENCH_OUTBOX_LIMIT}\n'
            + (f"workers = {self.workers}\n" if self.workers > 1 else ""),
            f'[upstream]\ntarget = "{self.upstream}"\n',
            f'[[keypairs]]\naccess_key = "{SUPER_KEY}"\nsecret_key = "{SUPER_SECRET}"\n'
            'role = "superadmin"\nuser_id = "bench-super"\ndomain = "default"\n',
        ]
        limits = proxy_limits()
        if limits:
            lines.append("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items()))
        if self.keep_state:
            lines.append("[state]\nidle_timeout = 0\n")
        lines.extend(
            f'[[keypairs]]\naccess_key = "{user_key(i)}"\nsecret_key = "{user_secret(i)}"\n'
            f'role = "user"\nuser_id = "{user_id(i)}"\ndomain = "default"\n'
            for i in range(users)
        )
        config.write_text("".join(lines))
        child = Child(
            self.key,
            [*PROXY_CMD, "--log-level", "WARNING", "serve", "--config", str(config)],
            self.work / "logs",
            control=False,
        )
        self.procs.append(child)
        port = wait_listening(child.proc, 60)
        wait_http(port, "/readyz", 60, child.proc)
        self.paths = Paths(port, EVENTS_PATH, EVENTS_PATH, "super", "user")
        return self.paths


class ProxyWorkersSystem(ProxySystem):
    """This proxy with two workers: the supervisor's and both workers' CPU and RSS."""

    key = "proxy2"
    label = "this proxy, --workers 2"
    scenarios = frozenset({"fanout", "churn", "storm"})
    workers = 2

    def pids(self) -> list[int]:
        pids = super().pids()
        if self.procs:
            pids.extend(child_pids(self.procs[0].pid))  # the workers
        return pids


class _PeerSystem(System):
    module = ""
    requires: tuple[str, ...] = ()

    @classmethod
    def missing(cls) -> str | None:
        absent = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(absent)} (make bench installs them)" if absent else None

    def start(self, *, users: int, route: str) -> Paths:
        child = Child(
            self.key,
            [sys.executable, "-m", self.module, "--port", "0", "--upstream", self.upstream],
            self.work / "logs",
            control=False,
        )
        self.procs.append(child)
        port = wait_listening(child.proc, 60)
        wait_http(port, "/readyz", 60, child.proc)
        self.paths = Paths(port, EVENTS_PATH, EVENTS_PATH + "?ownerAccessKey={ak}", "none", "none")
        return self.paths


class AiohttpSystem(_PeerSystem):
    key = "aiohttp"
    label = "original design (aiohttp + aiohttp-sse)"
    filtering = "every event to every client queue; each client filters"
    module = "bench.peers.aiohttp_server"
    requires = ("aiohttp", "aiohttp_sse")


class StarletteSystem(_PeerSystem):
    key = "starlette"
    label = "sse-starlette on uvicorn"
    filtering = "every event to every client queue; each client filters"
    module = "bench.peers.starlette_server"
    requires = ("sse_starlette", "uvicorn", "starlette")


NGINX_CONF: Final = """\
load_module {module};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 20000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  nchan_max_reserved_memory 512M;
  server {{
    listen {host}:{port} backlog=4096;
    location = /pub {{
      nchan_publisher;
      nchan_channel_id $arg_id;
      nchan_message_buffer_length 4096;
      nchan_message_timeout 60s;
    }}
    location = /sub {{
      nchan_subscriber eventsource;
      nchan_channel_id $arg_id;
      nchan_subscriber_first_message newest;
    }}
  }}
}}
"""


class SendFloorSystem(_PeerSystem):
    key = "floor"
    label = "send floor (uvloop: one write per client, nothing else)"
    filtering = "none: every event to every connection"
    module = "bench.peers.send_floor"
    scenarios = frozenset({"fanout"})


class NchanSystem(System):
    key = "nchan"
    label = "nginx + nchan (C; via an HTTP publish bridge)"
    filtering = "none: one channel per route (all, or per owner key)"

    @classmethod
    def missing(cls) -> str | None:
        if shutil.which("nginx") is None or not NCHAN_MODULE.is_file():
            return "nginx or libnginx-mod-nchan is not installed (make bench installs them)"
        return None

    def start(self, *, users: int, route: str) -> Paths:
        port = free_port()
        work = self.work / "nchan"
        work.mkdir(parents=True, exist_ok=True)
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(module=NCHAN_MODULE, work=work, host=HOST, port=port))
        nginx = Child(
            "nginx",
            ["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "error.log")],
            self.work / "logs",
            control=False,
        )
        self.procs.append(nginx)
        wait_port(port, 20)
        if port not in listening_ports(nginx.pid):
            raise ChildError(f"port {port} was taken by another process before nginx")
        bridge = Child(
            "nchan-bridge",
            [
                sys.executable,
                "-m",
                "bench.peers.nchan_bridge",
                "--upstream",
                self.upstream,
                "--nchan",
                str(port),
                "--route",
                route,
            ],
            self.work / "logs",
        )
        self.procs.append(bridge)
        if not bridge.expect(30).get("ready"):
            raise ChildError("nchan bridge did not attach")
        self.paths = Paths(port, "/sub?id=all", "/sub?id={ak}", "none", "none")
        return self.paths

    def pids(self) -> list[int]:
        pids = super().pids()
        if self.procs:
            pids.extend(child_pids(self.procs[0].pid))  # nginx's worker
        return pids


class GrpcSystem(System):
    """The bare drain is its own client: the harness talks to it like a load generator."""

    key = "grpc"
    label = "bare grpcio client (upstream limit)"
    filtering = "none"
    scenarios = frozenset({"ingest"})

    def start(self, *, users: int, route: str) -> Paths:
        child = Child(
            "grpc-drain",
            [sys.executable, "-m", "bench.peers.grpc_drain", "--upstream", self.upstream],
            self.work / "logs",
        )
        self.procs.append(child)
        if not child.call({"op": "ready", "timeout": 20}, 30).get("ready"):
            raise ChildError("grpc drain did not attach")
        self.paths = Paths(0, "", "", "none", "none")
        return self.paths


SYSTEMS: Final[dict[str, type[System]]] = {
    cls.key: cls
    for cls in (
        ProxySystem,
        ProxyWorkersSystem,
        AiohttpSystem,
        StarletteSystem,
        NchanSystem,
        GrpcSystem,
        SendFloorSystem,
    )
}
