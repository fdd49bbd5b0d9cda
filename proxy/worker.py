"""One worker of ``serve --workers N``, started by the supervisor (supervisor.py).

Its command line carries nothing secret: which worker it is, its control socket's
descriptor and how to log. The settings arrive on that socket, as the supervisor
merged them (file, environment, flags, and what it made once for the whole group);
the listening sockets are descriptors it inherited. From there it is a whole proxy
(``server.run_proxy``) that asks its group for limits, metrics and health.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence

import trio

from .cli import configure_logging, serve_until_signal, settle_garbage_collector
from .config import ConfigError, settings_from_sources
from .group import Link, LinkClosed, WorkerGroup

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, worker=args.index)
    try:
        trio.run(_serve, args.control_fd, args.index)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except LinkClosed:
        log.error("the supervisor went away before this worker started")
        return 1
    return 0


async def _serve(control_fd: int, index: int) -> None:
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd))
    link = Link(trio.SocketStream(sock))
    start = await link.receive_first()
    settings = settings_from_sources(start["settings"])
    group = WorkerGroup(
        link,
        index=index,
        workers=int(start["workers"]),
        listen=[int(fd) for fd in start["listen"]],
        metrics_listen=[int(fd) for fd in start["metrics_listen"]],
    )
    settle_garbage_collector()
    await serve_until_signal(settings, group=group)


if __name__ == "__main__":
    sys.exit(main())
