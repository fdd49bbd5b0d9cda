"""System 5: a bare grpcio client draining the upstream (the limit of the upstream hop).

    python -m bench.peers.grpc_drain --upstream HOST:PORT

A blocking ``Subscribe`` iterator in a thread that counts events and notes when they
arrived; nothing is decoded beyond what grpcio hands over. Speaks the load
generator's ``reset``/``report`` commands, so the harness measures it like a client.
"""

from __future__ import annotations

import argparse
import threading
import time

import grpc

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy._pb.kernel_events.v1 import events_pb2_grpc as pb_grpc

from ..common import Json, command_loop, self_cpu_seconds


class Drain:
    def __init__(self, target: str) -> None:
        self.target = target
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.deliveries = 0
        self.first = 0.0
        self.last = 0.0

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.KernelEventsServiceStub(channel)
            for response in stub.Subscribe(pb.SubscribeRequest()):
                self.ready.set()
                n = len(response.events)
                if not n:
                    continue
                now = time.time()
                with self.lock:
                    self.deliveries += n
                    self.first = self.first or now
                    self.last = now

    def handle(self, cmd: Json) -> Json:
        op = cmd["op"]
        if op == "ready":
            return {"ready": self.ready.wait(float(cmd.get("timeout", 10)))}
        if op == "reset":
            with self.lock:
                self.deliveries, self.first, self.last = 0, 0.0, 0.0
            return {"ok": True, "cpu": self_cpu_seconds()}
        if op == "report":
            with self.lock:
                return {
                    "deliveries": self.deliveries,
                    "overflows": 0,
                    "first": self.first,
                    "last": self.last,
                    "held": 1,
                    "lost": 0,
                    "failed": 0,
                    "cpu": self_cpu_seconds(),
                    "hist": {},
                }
        if op == "close":
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    drain = Drain(args.upstream)
    threading.Thread(target=drain.run, name="drain", daemon=True).start()
    command_loop(drain.handle)


if __name__ == "__main__":
    main()
