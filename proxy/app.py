"""The HTTP shell: a quart-trio app wiring authentication, policy and the hub.

Every decision is delegated to a pure core (signing, policy, eventid); this module
only reads the request, maps errors to JSON answers, and writes the outbox to the
socket.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast
from urllib.parse import parse_qs

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from werkzeug.sansio.utils import get_host

from . import __version__
from .config import Settings
from .eventid import Cursor, InvalidEventId, parse_id
from .hub import Hub
from .limits import (
    RateLimiter,
    StreamLimitExceeded,
    StreamSlots,
    client_address,
    parse_networks,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .openapi import DOCUMENT as OPENAPI
from .policy import PolicyError, Principal, resolve_filters
from .sessions import authenticate_browser
from .signing import AuthError, Keypair, verify
from .stream import Receive, Send, StreamPlan, StreamWriter
from .upstream import UpstreamBridge
from .web import (
    Cors,
    LoginLimits,
    browser_blueprint,
    jwt_verifier,
    prefers_html,
    session_codec,
    ui_response,
)

log = logging.getLogger(__name__)

API_VERSION: Final = "v4.20190615"
EVENTS_PATH: Final = "/stream/kernel/_/events"
MAX_QUERY_FIELDS: Final = 16
# Headers that authenticate a request must appear once: with two, which one was signed?
_SINGLE_HEADERS: Final = frozenset(
    {"authorization", "date", "x-backendai-date", "host", "content-type", "x-backendai-version"}
)
# Where a request's admitted stream slots are noted, to be given back when it ends.
_SLOTS_SCOPE_KEY: Final = "kep.stream_slots"
# Where the events route leaves an admitted stream's plan for _serve_streams.
_PLAN_SCOPE_KEY: Final = "kep.stream_plan"


class RequestError(Exception):
    def __init__(
        self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
        self.headers = dict(headers or {})


def error_response(
    status: int, error: str, detail: str, extra_headers: Mapping[str, str] | None = None
) -> Response:
    titles = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        408: "Request Timeout",
        414: "URI Too Long",
        415: "Unsupported Media Type",
        429: "Too Many Requests",
        431: "Request Header Fields Too Large",
        500: "Internal Server Error",
        503: "Service Unavailable",
    }
    body = {
        "status": status,
        "error": error,
        "title": titles.get(status, "Error"),
        "detail": detail,
    }
    headers = {"WWW-Authenticate": "BackendAI"} if status == 401 else {}
    response = Response(_json(body), status=status, content_type="application/json")
    response.headers.update(headers)
    response.headers.update(extra_headers or {})
    return response


def _json(body: Mapping[str, Any]) -> str:
    import json

    return json.dumps(body, separators=(",", ":"))


def create_app(
    settings: Settings,
    hub: Hub,
    bridge: UpstreamBridge,
    metrics: Metrics,
    keys: Mapping[str, Keypair] | None = None,
) -> QuartTrio:
    app = QuartTrio(__name__)
    # No deadline on writing an answer: a slow reader is the kernel write timeout's to
    # end (server.py). Event streams are served outside quart (_serve_streams).
    app.config["RESPONSE_TIMEOUT"] = None
    # The live key set (reloaded from the keypairs file), or the configured one.
    keypairs: Mapping[str, Keypair] = keys if keys is not None else settings.keypair_index()
    skew = timedelta(seconds=settings.auth.max_clock_skew)
    writer = StreamWriter(hub, bridge.fetch, metrics)
    hub.on_write = metrics.delivery_latency.observe
    # Browsers and token holders: session cookies and bearer JWTs (sessions.py, web.py).
    codec, bearer = session_codec(settings.session), jwt_verifier(settings.jwt)
    # Abuse limits (limits.py): stream caps, request sizes, login rates.
    limits = settings.limits
    slots = StreamSlots(limits.max_streams_per_key, limits.max_streams)
    trusted_proxies = parse_networks(limits.trusted_proxies)

    def remote_client() -> str:
        return client_address(
            request.remote_addr, request.headers.getlist("X-Forwarded-For"), trusted_proxies
        )

    def authenticate() -> Principal:
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            if name in headers and name in _SINGLE_HEADERS:
                raise RequestError(400, "duplicate-header", f"header {name!r} appears twice")
            headers[name] = raw_value.decode("latin-1")
        if "host" not in headers and ":authority" in headers:
            headers["host"] = headers[":authority"]  # HTTP/2 carries the host here
        try:
            browser = authenticate_browser(
                headers.get("authorization"),
                request.cookies.get(settings.session.cookie_name),
                bearer=bearer,
                codec=codec,
                lookup=keypairs.get,
            )
            if browser is not None:
                return browser
            return verify(
                method=request.method,
                raw_target=_raw_target(request.scope),
                headers=headers,
                lookup=keypairs.get,
                now=datetime.now(UTC),
                max_skew=skew,
            )
        except AuthError as exc:
            metrics.auth_failures[exc.reason] += 1
            log.info("auth failure (%s) from %s", exc.reason, request.remote_addr)
            raise RequestError(401, exc.reason, exc.message) from None

    def query_params() -> dict[str, list[str]]:
        raw: bytes = request.scope["query_string"]
        try:
            return parse_qs(
                raw.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=False,
                max_num_fields=MAX_QUERY_FIELDS,
                errors="strict",  # a percent-escape that is not UTF-8 is an error
            )
        except UnicodeDecodeError:
            raise RequestError(400, "bad-query", "query string is not valid UTF-8") from None
        except ValueError:
            raise RequestError(
                400, "bad-query", f"more than {MAX_QUERY_FIELDS} query parameters"
            ) from None

    def resume_cursor(params: Mapping[str, list[str]]) -> Cursor | None:
        header = request.headers.getlist("Last-Event-ID")
        raw = header or params.get("lastEventId", [])
        if len(raw) > 1:
            raise RequestError(400, "bad-last-event-id", "Last-Event-ID given more than once")
        if not raw or raw[0] == "":
            return None  # an empty Last-Event-ID means "no id yet" (WHATWG)
        try:
            return parse_id(raw[0])
        except InvalidEventId as exc:
            raise RequestError(400, "bad-last-event-id", str(exc)) from None

    @app.errorhandler(RequestError)
    async def _on_request_error(exc: RequestError) -> Response:
        if exc.status in (408, 414, 429, 431, 503):
            metrics.limited[exc.error] += 1
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.before_request
    async def _check_sizes() -> None:
        raw_query: bytes = request.scope["query_string"]
        if len(raw_query) > limits.max_query_length:
            raise RequestError(
                414,
                "uri-too-long",
                f"the query string is longer than {limits.max_query_length} bytes "
                "(limits.max_query_length)",
            )
        header_bytes = sum(len(k) + len(v) for k, v in request.scope["headers"])
        if header_bytes > limits.max_header_bytes:
            raise RequestError(
                431,
                "headers-too-large",
                f"the request headers are larger than {limits.max_header_bytes} bytes "
                "(limits.max_header_bytes)",
            )

    @app.errorhandler(HTTPException)
    async def _on_http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        return error_response(
            code, (exc.name or "error").lower().replace(" ", "-"), exc.description or ""
        )

    @app.get("/")
    async def index() -> dict[str, Any] | Response:
        # A browser (it prefers text/html) gets the dashboard; the SDK's `*/*`, JSON.
        if prefers_html(request.headers.get("Accept")):
            return ui_response()
        return {"version": API_VERSION, "manager": "kernel-events-proxy", "proxy": __version__}

    @app.after_request
    async def _vary_on_accept(response: Response) -> Response:
        if request.path == "/":
            response.vary.add("Accept")
        return response

    app.register_blueprint(
        browser_blueprint(
            lookup=lambda access_key: keypairs.get(access_key),
            session=settings.session,
            codec=codec,
            cors=Cors(frozenset(settings.server.cors_origins)),
            on_auth_failure=lambda reason: metrics.auth_failures.update([reason]),
            request_error=RequestError,
            login_limits=LoginLimits(
                per_address=RateLimiter(limits.login_attempts_per_address, limits.login_window),
                per_key=RateLimiter(limits.login_failures_per_key, limits.login_window),
                body_timeout=limits.body_timeout,
                client=remote_client,
            ),
        )
    )

    @app.get("/openapi.json")
    async def openapi() -> dict[str, Any]:
        return OPENAPI

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        live = bridge.live
        body = {"status": "ready" if live else "upstream-unavailable", "upstream": live}
        return Response(_json(body), status=200 if live else 503, content_type="application/json")

    if settings.server.metrics_bind is None:

        @app.get("/metrics")
        async def metrics_endpoint() -> Response:
            return Response(metrics.render(), content_type=METRICS_CONTENT_TYPE)

    @app.get(EVENTS_PATH)
    async def events() -> Response:
        principal = authenticate()
        params = query_params()
        try:
            filters = resolve_filters(principal, params, extra_allowed=frozenset({"lastEventId"}))
        except PolicyError as exc:
            raise RequestError(
                exc.status, "forbidden" if exc.status == 403 else "bad-parameter", exc.message
            ) from None
        cursor = resume_cursor(params)
        # Admission: a slot is taken now, synchronously (concurrent requests cannot all
        # pass the check before one subscribes), and given back when the request ends.
        try:
            slots.acquire(principal.access_key)
        except StreamLimitExceeded as exc:
            log.info(
                "stream refused (%s): %s from %s", exc.error, principal.access_key, remote_client()
            )
            raise RequestError(
                exc.status, exc.error, exc.detail, {"Retry-After": str(exc.retry_after)}
            ) from None
        cast(dict[str, Any], request.scope).setdefault(_SLOTS_SCOPE_KEY, []).append(
            principal.access_key
        )
        # Clients that declare they speak text/event-stream (EventSource always does) get
        # id-only position blocks; the official SDK sends `*/*` and would turn such a
        # block into an empty "message" event.
        positions = "text/event-stream" in request.headers.get("Accept", "")
        if request.method == "GET":
            # Admitted: the stream itself is served once this request is over (see
            # _serve_streams). A HEAD gets the same head and no body.
            cast(dict[str, Any], request.scope)[_PLAN_SCOPE_KEY] = StreamPlan(
                principal, filters, cursor, positions, request.remote_addr
            )
        response = Response(b"", content_type="text/event-stream; charset=utf-8")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        return response

    _guard_asgi(app, slots, writer)
    return app


def _guard_asgi(app: QuartTrio, slots: StreamSlots, writer: StreamWriter) -> None:
    """Around every ASGI call: refuse what Quart would crash on; serve admitted streams;
    give back stream slots.

    - A Host that is not a valid IDNA name (``a..b``, a label over 63 characters) makes
      werkzeug raise ``BadHost`` while Quart builds the request context, outside every
      error handler: hypercorn answered 500 with an empty body and logged a traceback.
      It is refused here, in the API's JSON shape, before Quart sees it.
    - A request's stream slots go back when its call ends, however it ends: the call
      spans the whole response, body included, and a body generator that was never
      started (the client left first) has no ``finally`` to rely on.
    """
    inner = app.asgi_app

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not _routable_host(scope):
            body = _json(
                {
                    "status": 400,
                    "error": "bad-host",
                    "title": "Bad Request",
                    "detail": "the Host header is not a valid host name",
                }
            ).encode()
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
            return
        try:
            if scope["type"] == "http" and scope["path"] == EVENTS_PATH:
                await _serve_streams(inner, writer, scope, receive, send)
            else:
                await inner(scope, receive, send)
        finally:
            for key in scope.get(_SLOTS_SCOPE_KEY, ()):
                slots.release(key)

    app.asgi_app = asgi_app  # type: ignore[method-assign]


async def _serve_streams(
    inner: Callable[[Any, Any, Any], Awaitable[None]],
    writer: StreamWriter,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
) -> None:
    """The event stream route: quart admits (or refuses), then the stream runs bare.

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
    await send(
        {
            "type": "http.response.start",
            "status": head["status"],
            # The buffered answer was empty; the stream has no length.
            "headers": [(k, v) for k, v in head["headers"] if k.lower() != b"content-length"],
        }
    )
    del head
    await writer.serve(plan, scope, receive, send)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _admit(
    inner: Callable[[Any, Any, Any], Awaitable[None]], scope: dict[str, Any], receive: Receive
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
    plan: StreamPlan | None = scope.pop(_PLAN_SCOPE_KEY, None)
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


def _raw_target(scope: Mapping[str, Any]) -> str:
    """The request target exactly as the client sent it (what it signed)."""
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope["query_string"]
    target = raw_path + (b"?" + query if query else b"")
    return target.decode("latin-1")
