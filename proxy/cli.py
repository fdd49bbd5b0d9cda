"""The command line: ``serve``, ``upstream``, ``config check``, ``tail`` and ``wait``."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio
from pythonjsonlogger.json import JsonFormatter

from . import __version__, tail, wait
from .config import (
    SESSION_MODE_TEXT,
    ConfigError,
    KeypairSettings,
    Settings,
    load_settings,
    masked,
    resolve_workers,
    session_mode,
    settings_from_sources,
    settings_sources,
)
from .feeders import run_replay, run_simulator
from .group import WorkerGroup
from .server import RunningProxy, run_proxy
from .simulator import DEFAULT_TENANTS
from .supervisor import CannotListen, Supervisor, available_cores
from .upstream_server import EventLog, UpstreamServer

log = logging.getLogger("proxy")

_BIN = str(Path(sys.executable).parent)
DEMO_ROLES = (("AKDEMOUSER1", "user"), ("AKDEMOADMIN1", "admin"), ("AKDEMOSUPER1", "superadmin"))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernel-events-proxy",
        description="gRPC kernel lifecycle events re-emitted as filtered Server-Sent Events.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line, with structured fields (for log shippers)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", type=Path, help="TOML settings file")
    serve.add_argument("--bind", help="HOST:PORT to listen on (default 127.0.0.1:8080)")
    serve.add_argument("--upstream", help="upstream gRPC target HOST:PORT")
    serve.add_argument("--certfile", type=Path, help="TLS certificate (PEM); enables HTTP/2")
    serve.add_argument("--keyfile", type=Path, help="TLS private key (PEM)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="start an embedded simulated upstream and demo keypairs (loopback only)",
    )
    serve.add_argument("--demo-rate", type=float, default=5.0, help="demo events per second")
    serve.add_argument(
        "--workers",
        metavar="N",
        help='processes serving the same sockets, or "auto" (one per core); default 1: '
        "this process alone",
    )
    serve.set_defaults(func=_cmd_serve)

    upstream = sub.add_parser("upstream", help="run the shipped gRPC upstream")
    upstream.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT")
    upstream.add_argument("--replay", type=Path, help="JSON Lines file of events to stream")
    upstream.add_argument("--follow", action="store_true", help="also stream appended lines")
    upstream.add_argument(
        "--rate", type=float, default=None, help="events per second (0: as fast as possible)"
    )
    upstream.add_argument("--seed", type=int, default=None, help="simulator seed")
    upstream.add_argument("--history", type=int, default=100_000, help="events retained")
    upstream.set_defaults(func=_cmd_upstream)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check",
        help="validate a settings file (with KEP_* variables applied) and print the "
        "effective settings, secrets masked",
    )
    check.add_argument("file", type=Path)
    check.set_defaults(func=_cmd_config_check)

    tail.add_parser(sub)
    wait.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"kernel-events-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def configure_logging(level: str, fmt: str, *, worker: int | None = None) -> None:
    """Text or JSON lines on stderr; a group's worker says which one it is in each."""
    handler = logging.StreamHandler(sys.stderr)
    which = ""
    if worker is not None:
        handler.addFilter(_WorkerFilter(worker))
        which = " worker %(worker)s" if fmt == "text" else " %(worker)s"
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                f"%(asctime)s %(levelname)s{which} %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger", "asctime": "time"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s{which} %(name)s: %(message)s")
        )
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _WorkerFilter(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def _is_loopback(host_port: str) -> bool:
    host = host_port.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Collect the young generation every 20,000 new container objects, not 700; the middle
# one every 4th time, the oldest after 100 of those (CPython's defaults: 700, 10, 10).
# A middle collection walks everything that survived since the last one: every 20th
# time, in a reconnect storm, that was pauses of 250 to 320 ms (the staying clients'
# p99); every 4th, 120 to 160 ms, for the same total. The oldest is still walked every
# 400 young collections, and only when it grew by a quarter (CPython's own rule).
GC_THRESHOLDS: Final = (20_000, 4, 100)


def settle_garbage_collector() -> None:
    """Keep what start-up built (modules, classes, functions: most of the heap) out of
    every later collection. A full collection otherwise walks all of it, again and
    again, for as long as the process serves; it cannot be garbage anyway.

    Then collect less often (``GC_THRESHOLDS``). Every connection allocates hundreds of
    container objects that live as long as it does, so with thousands of clients
    (re)connecting at once the default thresholds ran collections that walk the whole
    heap of held connections again and again: 40 % of the CPU of a 4,000-client storm
    (docs/benchmarks.md). Nearly everything here is freed by reference counting anyway;
    cyclic garbage just waits longer, and the young generation stays a few MiB."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _cmd_serve(args: argparse.Namespace) -> int:
    # Precedence: defaults < --config file < KEP_* environment < command-line flags.
    flags: dict[str, Any] = {}
    if args.bind:
        flags.setdefault("server", {})["bind"] = args.bind
    if args.upstream:
        flags.setdefault("upstream", {})["target"] = args.upstream
    for name in ("certfile", "keyfile"):
        if getattr(args, name):
            flags.setdefault("server", {})[name] = getattr(args, name)
    if args.workers is not None:
        flags.setdefault("server", {})["workers"] = args.workers
    if not args.demo:
        sources, origin = settings_sources(args.config, os.environ, flags)
        settings = settings_from_sources(sources, origin, args.config)
        if not settings.keypairs:
            raise ConfigError("no [[keypairs]] configured: every request would be refused")
        return _serve(args, settings, sources, None)
    # The demo's upstream, keypairs and session key are made here, once: with several
    # workers, all of them serve the same demo.
    event_log = EventLog()
    upstream = UpstreamServer(event_log, "127.0.0.1:0")
    demo_keys = _demo_keypairs()
    flags.setdefault("upstream", {})["target"] = upstream.target
    flags["keypairs"] = [
        kp.model_dump() | {"secret_key": kp.secret_key.get_secret_value()} for kp in demo_keys
    ]
    # Signs the dashboard's session cookies; new every run, like the demo secrets.
    flags["session"] = {"secret_key": secrets.token_urlsafe(32)}
    try:
        sources, origin = settings_sources(args.config, os.environ, flags)
        settings = settings_from_sources(sources, origin, args.config)
        if not _is_loopback(settings.server.bind):
            raise ConfigError(f"--demo binds to loopback only, not {settings.server.bind}")
    except ConfigError:
        upstream.stop(0)
        raise
    stop = threading.Event()
    feeder = threading.Thread(
        target=run_simulator, args=(event_log, args.demo_rate, stop), name="demo-feeder"
    )
    upstream.start()
    feeder.start()
    try:
        return _serve(args, settings, sources, _demo_banner(demo_keys))
    finally:
        stop.set()
        feeder.join()
        upstream.stop(0)


def _serve(
    args: argparse.Namespace,
    settings: Settings,
    sources: dict[str, Any],
    banner: Callable[[str], str] | None,
) -> int:
    workers = resolve_workers(settings.server.workers, available_cores())
    if workers == 1:
        settle_garbage_collector()
        trio.run(partial(serve_until_signal, settings, banner=banner))
        return 0
    try:
        supervisor = Supervisor(
            sources,
            settings,
            workers,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    except CannotListen as exc:
        print(f"kernel-events-proxy: {exc}", file=sys.stderr)
        return 1

    def on_serving(url: str) -> None:
        if banner is not None:
            print(banner(url), flush=True)
        log.info(
            "serving on %s with %d workers (upstream %s)", url, workers, settings.upstream.target
        )

    return trio.run(supervisor.run, on_serving)


def _cmd_config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file, os.environ)
    json.dump(masked(settings), sys.stdout, indent=2)
    print()
    print(f"{args.file}: OK ({len(settings.keypairs)} keypair(s))", file=sys.stderr)
    mode = session_mode(settings.session)
    print(f"browser sign-in: {SESSION_MODE_TEXT[mode]}", file=sys.stderr)
    return 0


def _demo_keypairs() -> list[KeypairSettings]:
    tenants = {t.access_key: t for t in DEFAULT_TENANTS}
    out = []
    for access_key, role in DEMO_ROLES:
        tenant = tenants[access_key]
        out.append(
            KeypairSettings(
                access_key=access_key,
                secret_key=secrets.token_urlsafe(24),  # type: ignore[arg-type]
                role=role,  # type: ignore[arg-type]
                user_id=tenant.user_id,
                domain=tenant.domain,
            )
        )
    return out


def _tail_command(url: str, key: KeypairSettings) -> str:
    # Credentials go in the environment, not in arguments other users can see in `ps`.
    return (
        f"BACKEND_ACCESS_KEY={key.access_key} "
        f"BACKEND_SECRET_KEY={key.secret_key.get_secret_value()} "
        f"{_BIN}/kernel-events-proxy tail --url {url}"
    )


def _demo_banner(keys: Sequence[KeypairSettings]) -> Callable[[str], str]:
    def banner(url: str) -> str:
        lines = [
            "",
            f"kernel-events-proxy demo: {url}  (simulated upstream, loopback only)",
            "",
            "Demo keypairs (one per role; new secrets every run):",
        ]
        for kp in keys:
            lines.append(
                f"  {kp.role:<10}  access key {kp.access_key:<13}  secret key "
                f"{kp.secret_key.get_secret_value()}"
            )
        su = keys[-1]
        user = keys[0]
        lines += [
            "",
            f"Dashboard, in a browser: {url}/",
            f"  log in with a keypair above, e.g. the user: access key {user.access_key}, "
            f"secret key {user.secret_key.get_secret_value()}",
            "",
            "Live events, as the superadmin (paste into another terminal):",
            f"  {_tail_command(url, su)}",
            "",
            "Only one user's sessions:",
            f"  {_tail_command(url, user)}",
            "",
            f"Version document: curl {url}/   Readiness: curl {url}/readyz",
            "Stop with Ctrl-C.",
            "",
        ]
        return "\n".join(lines)

    return banner


async def serve_until_signal(
    settings: Settings,
    *,
    banner: Callable[[str], str] | None = None,
    group: WorkerGroup | None = None,
) -> None:
    """One proxy until SIGINT/SIGTERM (graceful shutdown); SIGHUP reloads keypairs.
    ``group``: as a worker of a group, which is told once this one serves."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            proxy: RunningProxy = await nursery.start(partial(run_proxy, settings, group=group))
            if banner is not None:
                print(banner(proxy.url), flush=True)
            else:
                log.info("serving on %s (upstream %s)", proxy.url, settings.upstream.target)
            if group is not None:
                group.ready()  # after the signal handlers: SIGHUP and SIGTERM are safe now
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP: reloading keypairs")
                    proxy.reload_keys()
                    continue
                log.info("received %s: shutting down", signal.Signals(signum).name)
                proxy.shutdown()
                break


def _cmd_upstream(args: argparse.Namespace) -> int:
    if args.follow and not args.replay:
        raise ConfigError("--follow needs --replay FILE")
    if args.replay and not args.replay.is_file():
        raise ConfigError(f"--replay: no such file: {args.replay}")
    event_log = EventLog(capacity=args.history)
    server = UpstreamServer(event_log, args.listen)
    stop = threading.Event()
    if args.replay:
        rate = 0.0 if args.rate is None else args.rate
        target: Callable[[], None] = lambda: run_replay(  # noqa: E731
            event_log, args.replay, stop, follow=args.follow, rate=rate
        )
    else:
        rate = 5.0 if args.rate is None else args.rate
        target = lambda: run_simulator(event_log, rate, stop, args.seed)  # noqa: E731
    feeder = threading.Thread(target=target, name="upstream-feeder")
    server.start()
    print(f"upstream serving on {server.target} (log {event_log.log_id})", flush=True)
    feeder.start()
    stopped = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopped.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopped.wait(0.5):
            pass
    finally:
        stop.set()
        feeder.join()
        event_log.close()  # subscribers' streams end cleanly before the server stops
        server.stop(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
