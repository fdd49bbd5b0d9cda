"""The peers' upstream: the same gRPC subscription, read in a thread, handed to asyncio.

The thread hands each response (a batch of up to 512 events) to the event loop and
waits until the loop took it, through a bounded queue: when the loop falls behind, the
thread stops reading and gRPC flow control pushes back on the upstream, as in this
proxy. Events are decoded once (``proxy.events.from_proto``); what each system then
does with them is its own design.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

import grpc

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy._pb.kernel_events.v1 import events_pb2_grpc as pb_grpc
from proxy.events import Event, from_proto

from ..common import raise_fd_limit

log = logging.getLogger(__name__)

QUEUED_RESPONSES = 4


def peer_start(description: str | None) -> tuple[argparse.Namespace, str]:
    """A peer server's start: ``--port`` and ``--upstream`` from the command line, the
    file limit raised, asyncio on uvloop when installed. Returns the arguments and the
    loop's name (``install_uvloop``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    raise_fd_limit()
    return args, install_uvloop()


def install_uvloop() -> str:
    """Run asyncio on uvloop when it is installed (as production deployments do)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


class Feed:
    """Subscribe to ``target``; call ``publish`` in the loop with each decoded batch."""

    def __init__(self, target: str, publish: Callable[[Sequence[Event]], None]) -> None:
        self.target = target
        self.publish = publish
        self.ready = False
        self._queue: asyncio.Queue[pb.SubscribeResponse] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[pb.SubscribeResponse] = asyncio.Queue(QUEUED_RESPONSES)
        self._queue = queue
        threading.Thread(target=self._read, args=(loop, queue), daemon=True).start()
        while True:
            response = await queue.get()
            self.ready = True
            if response.events:
                self.publish([from_proto(e) for e in response.events])

    def _read(
        self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[pb.SubscribeResponse]
    ) -> None:
        channel = grpc.insecure_channel(self.target)
        stub = pb_grpc.KernelEventsServiceStub(channel)
        try:
            for response in stub.Subscribe(pb.SubscribeRequest()):
                asyncio.run_coroutine_threadsafe(queue.put(response), loop).result()
        except grpc.RpcError as exc:  # the benchmark restarts systems, not streams
            log.error("upstream stream ended: %s", exc)
        finally:
            channel.close()
