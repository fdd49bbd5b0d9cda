"""Memory per idle SSE connection: RSS of a real proxy process holding N streams.

    .venv/bin/python bench/idle_connections.py [--counts 1000 5000]

Starts the shipped upstream and one proxy as separate processes on loopback, opens N
signed event streams from this process (a separate load generator), and reports the
proxy's RSS growth per connection. Timings do not matter here; memory does.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import trio

from proxy.signing import sign_headers

BIN = Path(sys.executable).parent / "kernel-events-proxy"
PATH = "/stream/kernel/_/events"
KEY, SECRET = "AKBENCH", "bench-secret-key-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raise_fd_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def open_streams(port: int, n: int, holder: list[trio.SocketStream]) -> None:
    host = f"127.0.0.1:{port}"
    headers = sign_headers(
        method="GET",
        raw_target=PATH,
        host=host,
        access_key=KEY,
        secret_key=SECRET,
        date=datetime.now(UTC),
    )
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: {host}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    ).encode()
    limiter = trio.CapacityLimiter(200)

    async def one() -> None:
        async with limiter:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(request)
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
            assert head.startswith(b"HTTP/1.1 200"), head[:100]
            holder.append(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)


async def measure(proxy_port: int, proxy_pid: int, counts: list[int]) -> None:
    # Warm up: a few streams, so code paths and caches are loaded before the baseline.
    warm: list[trio.SocketStream] = []
    await open_streams(proxy_port, 10, warm)
    await trio.sleep(0.5)
    base = rss_kib(proxy_pid)
    held: list[trio.SocketStream] = []
    print(f"baseline RSS {base / 1024:.1f} MiB")
    for target in counts:
        await open_streams(proxy_port, target - len(held), held)
        await trio.sleep(1.0)
        now = rss_kib(proxy_pid)
        per = (now - base) / len(held)
        print(
            f"{len(held):>6} idle streams: RSS {now / 1024:.1f} MiB, {per:.1f} KiB per connection"
        )
    for s in held + warm:
        await s.aclose()


def run(counts: list[int]) -> None:
    hard = raise_fd_limit()
    print(f"file descriptor limit {hard}")
    with tempfile.TemporaryDirectory() as tmp:
        up_port, proxy_port = free_port(), free_port()
        config = Path(tmp) / "proxy.toml"
        config.write_text(
            f'[server]\nbind = "127.0.0.1:{proxy_port}"\n'
            f'[upstream]\ntarget = "127.0.0.1:{up_port}"\n'
            "[limits]\nmax_streams = 1000000\nmax_streams_per_key = 1000000\n"
            f'[[keypairs]]\naccess_key = "{KEY}"\nsecret_key = "{SECRET}"\n'
            'role = "superadmin"\nuser_id = "bench"\ndomain = "default"\n'
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
        upstream = subprocess.Popen(
            [str(BIN), "upstream", "--listen", f"127.0.0.1:{up_port}", "--rate", "0.001"],
            **quiet,  # type: ignore[call-overload]
        )
        # The proxy inherits this process's raised file-descriptor limit.
        proxy = subprocess.Popen(
            [str(BIN), "--log-level", "WARNING", "serve", "--config", str(config)],
            **quiet,  # type: ignore[call-overload]
        )
        try:
            time.sleep(2.0)
            trio.run(measure, proxy_port, proxy.pid, counts)
        finally:
            for proc in (proxy, upstream):
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 5000])
    args = parser.parse_args()
    run(args.counts)


if __name__ == "__main__":
    main()
