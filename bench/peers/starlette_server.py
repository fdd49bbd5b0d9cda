"""System 3: sse-starlette on uvicorn (the common Python choice), same fan-out as 2.

    python -m bench.peers.starlette_server --port P --upstream HOST:PORT

One unbounded ``asyncio.Queue`` per client, every event put into every queue, each
client filters (``ownerAccessKey``, ``sessionId``, ``group``) and yields
``{"event": name, "data": json.dumps(payload)}`` to ``EventSourceResponse``. uvicorn
runs with uvloop and httptools when they are installed (``uvicorn[standard]``). No
authentication.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy.events import Event

from ..common import EVENTS_PATH
from .feed import Feed, peer_start


def create_app(upstream: str) -> Starlette:
    queues: set[asyncio.Queue[Event]] = set()

    def publish(events: Sequence[Event]) -> None:
        for event in events:
            for queue in queues:
                queue.put_nowait(event)

    feed = Feed(upstream, publish)

    async def stream(request: Request) -> EventSourceResponse:
        owner = request.query_params.get("ownerAccessKey", "*")
        session = request.query_params.get("sessionId", "*")
        group = request.query_params.get("group", "*")
        queue: asyncio.Queue[Event] = asyncio.Queue()
        queues.add(queue)

        async def frames() -> AsyncIterator[dict[str, str]]:
            try:
                while True:
                    event = await queue.get()
                    if owner != "*" and event.owner_access_key != owner:
                        continue
                    if session != "*" and event.session_id != session:
                        continue
                    if group != "*" and event.group_name != group:
                        continue
                    yield {"event": event.name, "data": json.dumps(event.client_payload())}
            finally:
                queues.discard(queue)

        return EventSourceResponse(frames(), ping=15)

    async def readyz(request: Request) -> JSONResponse:
        return JSONResponse({"ready": feed.ready}, status_code=200 if feed.ready else 503)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(feed.run())
        try:
            yield
        finally:
            task.cancel()

    return Starlette(
        routes=[Route(EVENTS_PATH, stream), Route("/readyz", readyz)], lifespan=lifespan
    )


def main() -> None:
    args, loop = peer_start(__doc__.splitlines()[0])
    try:
        import httptools  # noqa: F401
    except ImportError:
        http = "h11"
    else:
        http = "httptools"
    uvicorn.run(
        create_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        backlog=4096,
        loop="uvloop" if loop == "uvloop" else "asyncio",
        http=http,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
