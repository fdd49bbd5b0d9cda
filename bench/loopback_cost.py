"""What one delivery costs the kernel here: a write and a read over loopback TCP.

    python -m bench.loopback_cost [--connections 1000] [--rounds 50] [--size 193]

Opens N loopback TCP connections (TCP_NODELAY on the writing side, as Trio and uvloop
set it) and, once per round, writes ``size`` bytes to each and then reads them back,
in one thread with non-blocking sockets, pausing 10 ms between rounds as the fan-out
scenario's 100 events/s do. Prints the median wall time per ``send`` and per
``recv``. No Python server, no load generator, no scheduling between processes: the
loopback stack's own cost per delivery, which bounds the fan-out latency any server
can reach in the harness (docs/benchmarks.md, "Where the time goes").
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

from .common import HOST, raise_fd_limit


def measure(connections: int, rounds: int, size: int) -> tuple[float, float]:
    """Median µs per send and per recv over ``rounds`` rounds (the first 5 warm up)."""
    listener = socket.create_server((HOST, 0), backlog=connections)
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        for _ in range(connections):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server.setblocking(False)
            client.setblocking(False)
            pairs.append((server, client))
        data = b"x" * size
        sends: list[float] = []
        recvs: list[float] = []
        for r in range(rounds + 5):
            t0 = time.perf_counter()
            for server, _ in pairs:
                server.send(data)
            t1 = time.perf_counter()
            for _, client in pairs:
                client.recv(65536)
            t2 = time.perf_counter()
            if r >= 5:
                sends.append((t1 - t0) / connections * 1e6)
                recvs.append((t2 - t1) / connections * 1e6)
            time.sleep(0.01)
        return statistics.median(sends), statistics.median(recvs)
    finally:
        for server, client in pairs:
            server.close()
            client.close()
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--size", type=int, default=193, help="bytes per write (a fan-out chunk)")
    args = parser.parse_args()
    raise_fd_limit()
    send, recv = measure(args.connections, args.rounds, args.size)
    n = args.connections
    print(
        f"{n:,} loopback TCP connections, {args.size} bytes each per round: "
        f"send {send:.2f} µs + recv {recv:.2f} µs per delivery "
        f"= {(send + recv) * n / 1000:.1f} ms of CPU per event sent to all {n:,}"
    )


if __name__ == "__main__":
    main()
