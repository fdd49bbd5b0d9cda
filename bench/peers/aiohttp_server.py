"""System 2: the original system's design, on aiohttp + aiohttp-sse.

    python -m bench.peers.aiohttp_server --port P --upstream HOST:PORT

As the Backend.AI manager's ``push_session_events`` did it: one unbounded
``asyncio.Queue`` per client; every event is put into every queue; each client's
handler takes events from its own queue, filters them (``ownerAccessKey``,
``sessionId``, ``group``), builds the JSON with ``json.dumps`` and sends it with
``resp.send(data, event=name)``. The payload is this proxy's (``client_payload``).
No authentication (the original's HMAC check is left out; so is its per-event
database lookup). aiohttp notices a client that went away at its next ping (15 s), as
the original did.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from aiohttp import web
from aiohttp_sse import sse_response

from proxy.events import Event

from ..common import EVENTS_PATH
from .feed import Feed, peer_start


def create_app(upstream: str) -> web.Application:
    queues: set[asyncio.Queue[Event]] = set()

    def publish(events: Sequence[Event]) -> None:
        for event in events:
            for queue in queues:
                queue.put_nowait(event)

    feed = Feed(upstream, publish)

    async def stream(request: web.Request) -> web.StreamResponse:
        owner = request.query.get("ownerAccessKey", "*")
        session = request.query.get("sessionId", "*")
        group = request.query.get("group", "*")
        queue: asyncio.Queue[Event] = asyncio.Queue()
        queues.add(queue)
        try:
            async with sse_response(request) as resp:
                while True:
                    event = await queue.get()
                    if owner != "*" and event.owner_access_key != owner:
                        continue
                    if session != "*" and event.session_id != session:
                        continue
                    if group != "*" and event.group_name != group:
                        continue
                    await resp.send(json.dumps(event.client_payload()), event=event.name)
        finally:
            queues.discard(queue)
        return resp

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"ready": feed.ready}, status=200 if feed.ready else 503)

    tasks: list[asyncio.Task[None]] = []

    async def start_feed(app: web.Application) -> None:
        tasks.append(asyncio.get_running_loop().create_task(feed.run()))

    app = web.Application()
    app.router.add_get(EVENTS_PATH, stream)
    app.router.add_get("/readyz", readyz)
    app.on_startup.append(start_feed)
    return app


def main() -> None:
    args, _ = peer_start(__doc__.splitlines()[0])
    web.run_app(
        create_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        backlog=4096,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()
