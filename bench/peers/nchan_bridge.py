"""System 4's feeder: the gRPC upstream republished to nginx + nchan over HTTP.

    python -m bench.peers.nchan_bridge --upstream HOST:PORT --nchan PORT --route all|owner

Every event becomes one ``POST /pub?id=<channel>`` (body: the same JSON payload as
every system; ``X-EventSource-Event: <name>`` names the SSE event), pipelined on one
keep-alive connection: a whole upstream batch goes out in one ``sendall``, and a
reader thread drains nchan's answers. ``--route all`` publishes everything to channel
``all``; ``--route owner`` to a channel per owner access key (how an nchan deployment
would route per user: nchan itself filters nothing). Prints ``{"ready": true}`` once
the upstream subscription is live.

Publishing is capped at ``MAX_RATE`` messages per second: nchan's message ids are
``<second>:<16-bit tag>``, and past 32,767 messages in one second on one channel the
tag wraps, subscribers miss messages ("previous message id tags don't match") and
the channel stalls. The cap is nchan's ceiling per channel, not the bridge's.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from typing import Final

import grpc

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy._pb.kernel_events.v1 import events_pb2_grpc as pb_grpc
from proxy.events import from_proto

from ..common import HOST

MAX_RATE: Final = 25_000  # with headroom: nginx may catch up on queued requests


def _drain(sock: socket.socket) -> None:
    while sock.recv(1 << 16):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--nchan", type=int, required=True, help="nchan's port")
    parser.add_argument("--route", choices=["all", "owner"], default="all")
    args = parser.parse_args()
    sock = socket.create_connection((HOST, args.nchan))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=_drain, args=(sock,), daemon=True).start()
    host = f"{HOST}:{args.nchan}"
    by_owner = args.route == "owner"
    channel = grpc.insecure_channel(args.upstream)
    stub = pb_grpc.KernelEventsServiceStub(channel)
    ready = False
    window, published = time.monotonic(), 0
    for response in stub.Subscribe(pb.SubscribeRequest()):
        if not ready:
            ready = True
            sys.stdout.write(json.dumps({"ready": True}) + "\n")
            sys.stdout.flush()
        parts: list[bytes] = []
        for msg in response.events:
            event = from_proto(msg)
            body = event.client_json().encode()
            chan = event.owner_access_key if by_owner else "all"
            parts.append(
                (
                    f"POST /pub?id={chan} HTTP/1.1\r\nHost: {host}\r\n"
                    f"X-EventSource-Event: {event.name}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
        if parts:
            sock.sendall(b"".join(parts))
            published += len(parts)
            ahead = window + published / MAX_RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            elif ahead < -1.0:  # idle for a while: start a new window
                window, published = time.monotonic(), 0


if __name__ == "__main__":
    main()
