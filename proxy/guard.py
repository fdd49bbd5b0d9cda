"""Around every ASGI call: refuse what Quart would crash on, serve admitted streams,
give back stream slots.

- A Host that is not a valid IDNA name (``a..b``, a label over 63 characters) makes
  werkzeug raise ``BadHost`` while Quart builds the request context, outside every
  error handler: hypercorn answered 500 with an empty body and logged a traceback.
  It is refused here, in the API's JSON shape, before Quart sees it.
- An event stream's request (any generation's path) is answered by quart in full, into
  a buffer; when the route admitted a stream (admission.py left a ``StreamPlan``), the
  stream is then served bare by ``StreamWriter`` with the same head.
- A request's stream slots go back when its call ends, however it ends: the call
  spans the whole response, body included, and a body generator that was never
  started (the client left first) has no ``finally`` to rely on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from werkzeug.sansio.utils import get_host

from . import direct
from .admission import PLAN_SCOPE_KEY, SLOTS_SCOPE_KEY
from .errors import error_body
from .generations import STREAM_PATHS
from .stream import Receive, Send, StreamPlan, StreamWriter

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def guard_asgi(inner: ASGIApp, release: Callable[[str], None], writer: StreamWriter) -> ASGIApp:
    """``inner`` (quart's ASGI callable) wrapped as this module describes; ``release``
    gives a stream slot back (group.Shared.release_stream)."""

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not _routable_host(scope):
            await _send_bad_host(send)
            return
        try:
            if scope["type"] == "http" and scope["path"] in STREAM_PATHS:
                await _serve_streams(inner, writer, scope, receive, send)
            else:
                await inner(scope, receive, send)
        finally:
            for key in scope.get(SLOTS_SCOPE_KEY, ()):
                release(key)

    return asgi_app


async def _send_bad_host(send: Send) -> None:
    body = error_body(400, "bad-host", "the Host header is not a valid host name").encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _serve_streams(
    inner: ASGIApp, writer: StreamWriter, scope: dict[str, Any], receive: Receive, send: Send
) -> None:
    """The event stream routes: quart admits (or refuses), then the stream runs bare.

    Quart answers the request in full, into a buffer: an error as it is, or, when the
    route admitted a stream, an empty response carrying every header quart and its
    hooks set (CORS, Vary, ...). That request, with its objects and tasks, is then
    over; the stream is served by ``StreamWriter`` in this task, with the same head.
    """
    plan, answer = await _admit(inner, scope, receive)
    if plan is None:
        for message in answer:
            await send(message)
        return
    head = answer[0]
    del answer  # an idle stream keeps as little as it can
    start = {
        "type": "http.response.start",
        "status": head["status"],
        # The buffered answer was empty; the stream has no length.
        "headers": [(k, v) for k, v in head["headers"] if k.lower() != b"content-length"],
    }
    del head
    await send(start)
    # Neither the request's headers (admission is over) nor the response's (on the
    # wire now; hypercorn keeps the message only for an access log, which is off) are
    # read again, and an idle stream would hold both for its life: about 1 KiB.
    start["headers"] = []
    scope["headers"] = ()
    await writer.serve(plan, scope, receive, send)
    if not direct.client_left(direct.current_connection()):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _admit(
    inner: ASGIApp, scope: dict[str, Any], receive: Receive
) -> tuple[StreamPlan | None, list[dict[str, Any]]]:
    """Run quart on the request; the plan if it admitted a stream, and its answer."""
    answer: list[dict[str, Any]] = []
    gone = False

    async def keep(message: dict[str, Any]) -> None:
        answer.append(message)

    async def watch() -> Mapping[str, Any]:
        nonlocal gone
        message = await receive()
        gone = gone or message["type"] == "http.disconnect"
        return message

    await inner(scope, watch, keep)
    plan: StreamPlan | None = scope.pop(PLAN_SCOPE_KEY, None)
    if gone or not answer or answer[0]["type"] != "http.response.start":
        plan = None  # the client left already, or quart did not answer
    return plan, answer


def _routable_host(scope: Mapping[str, Any]) -> bool:
    """Would werkzeug's URL adapter accept this request's host (``Map.bind``)?"""
    for name, value in scope["headers"]:
        if name not in (b"host", b":authority"):
            continue
        host = get_host(scope.get("scheme", "http"), value.decode("latin-1"), scope.get("server"))
        try:
            host.lower().partition(":")[0].encode("idna")
        except UnicodeError:
            return False
    return True
