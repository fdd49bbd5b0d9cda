"""The HTTP shell: a quart-trio app wiring authentication, policy and the hub.

Every decision is delegated to a pure core (signing, policy, eventid); this module
only reads the request, maps errors to JSON answers, and writes the outbox to the
socket.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast
from urllib.parse import parse_qs

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from werkzeug.sansio.utils import get_host

from . import __version__, direct, sse
from .config import Settings
from .eventid import Cursor, InvalidEventId, parse_id
from .hub import Hub, Subscription, encode, gap_frame
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
from .policy import Filters, PolicyError, Principal, resolve_filters, visible
from .sessions import authenticate_browser
from .signing import AuthError, Keypair, verify
from .upstream import Fetched, UpstreamBridge
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
# Reads (after, until] of a log from the upstream, for clients older than the history.
Fetch = Callable[[str, int, int], Awaitable[Fetched]]
# Headers that authenticate a request must appear once: with two, which one was signed?
_SINGLE_HEADERS: Final = frozenset(
    {"authorization", "date", "x-backendai-date", "host", "content-type", "x-backendai-version"}
)
# Where a request's admitted stream slots are noted, to be given back when it ends.
_SLOTS_SCOPE_KEY: Final = "kep.stream_slots"


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
    # Streams are long-lived by design; Quart's default would cut them after 60 s.
    app.config["RESPONSE_TIMEOUT"] = None
    # The live key set (reloaded from the keypairs file), or the configured one.
    keypairs: Mapping[str, Keypair] = keys if keys is not None else settings.keypair_index()
    skew = timedelta(seconds=settings.auth.max_clock_skew)
    writer = _Writer(hub, bridge.fetch, metrics)
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
        # A HEAD gets the same head and no body: nothing to subscribe for.
        body: Any = (
            b""
            if request.method == "HEAD"
            else writer.stream(
                principal, filters, cursor, positions, request.remote_addr, request.scope
            )
        )
        response = Response(body, content_type="text/event-stream; charset=utf-8")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    _guard_asgi(app, slots)
    return app


def _guard_asgi(app: QuartTrio, slots: StreamSlots) -> None:
    """Around every ASGI call: refuse what Quart would crash on; give back stream slots.

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
            await inner(scope, receive, send)
        finally:
            for key in scope.get(_SLOTS_SCOPE_KEY, ()):
                slots.release(key)

    app.asgi_app = asgi_app  # type: ignore[method-assign]


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


@dataclass(frozen=True)
class _Writer:
    """Writes one client's stream: position, catch-up, queued frames, heartbeats."""

    hub: Hub
    fetch: Fetch
    metrics: Metrics

    async def stream(
        self,
        principal: Principal,
        filters: Filters,
        cursor: Cursor | None,
        positions: bool,
        peer: str | None,
        scope: Mapping[str, Any],
    ) -> AsyncIterator[bytes]:
        hub = self.hub
        started = time.monotonic()
        with hub.subscribe(principal, filters, cursor, positions=positions) as sub:
            # Taken with the subscription, atomically: everything up to here is not
            # this client's to receive, so a reconnect from here loses nothing.
            start = hub.position() if positions and cursor is None else None
            # The response head is on the wire by now (quart sends it before the body).
            sink = direct.current_sink(scope)
            fields = {
                "access_key": principal.access_key,
                "role": principal.role.value,
                "filters": {
                    "sessionId": filters.session,
                    "ownerAccessKey": filters.owner,
                    "group": filters.group,
                },
                "resume": str(cursor) if cursor else None,
                "peer": peer,
            }
            log.info(
                "stream open: %s (%s) filters=%s resume=%s",
                principal.access_key,
                principal.role.value,
                fields["filters"],
                fields["resume"],
                extra={"event": "stream_open", **fields},
            )
            first = sse.encode_position(start) if start is not None else None
            try:
                if sink is not None:
                    # A write failing means the client went away mid-write.
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._direct(sub, sink, first)
                else:
                    if first is not None:
                        yield first
                    async for chunk in self._frames(sub):
                        yield chunk
            finally:
                duration = round(time.monotonic() - started, 3)
                reason = sub.outbox.reason or "client-gone"
                log.info(
                    "stream closed: %s after %.1fs, %d events sent, reason=%s",
                    principal.access_key,
                    duration,
                    sub.outbox.sent,
                    reason,
                    extra={
                        "event": "stream_close",
                        **fields,
                        "duration_s": duration,
                        "events_sent": sub.outbox.sent,
                        "reason": reason,
                    },
                )

    async def _frames(self, sub: Subscription) -> AsyncIterator[bytes]:
        """The ASGI path: every write is yielded to quart (TLS, HTTP/2, HTTP/1.0)."""
        outbox = sub.outbox
        while True:
            # Heartbeats arrive through the outbox too (Hub.run_heartbeats).
            since = outbox.since
            frames = [] if sub.catchup is not None else await outbox.take()
            # A catch-up (set at subscribe time, or by the first publish after it)
            # comes before anything queued: those events are older.
            while sub.catchup is not None:
                chunk = await self._catch_up(sub)
                if chunk:
                    yield chunk
            if frames:
                self.metrics.delivery_latency.observe(time.monotonic() - since)
                # Coalesce: everything queued goes out in one write.
                yield frames[0] if len(frames) == 1 else b"".join(frames)
            if outbox.closed and not len(outbox):
                return

    async def _direct(self, sub: Subscription, sink: direct.ChunkSink, first: bytes | None) -> None:
        """The direct path: the hub writes while this task idles (see direct.py).

        This task writes only what the hub cannot: the opening position, catch-ups,
        what a full socket did not take, and the end of a closed stream.
        """
        outbox = sub.outbox
        self.hub.attach_sink(sub, sink)  # busy: the hub queues for this task until idle
        if first is not None:
            await sink.write(direct.chunk(first))
        while True:
            while sub.catchup is not None:
                chunk = await self._catch_up(sub)
                if chunk:
                    await sink.write(direct.chunk(chunk))
            if outbox.stalled:
                stalled, outbox.stalled = outbox.stalled, b""
                await sink.write(stalled)
            if len(outbox):
                since = outbox.since
                frames = outbox.take_now()
                await sink.write(direct.chunk(b"".join(frames)))
                self.metrics.delivery_latency.observe(time.monotonic() - since)
                continue
            if outbox.closed:
                return
            await outbox.idle()

    async def _catch_up(self, sub: Subscription) -> bytes:
        assert sub.catchup is not None
        cursor, until = sub.catchup
        fetched = await self.fetch(cursor.log_id, cursor.sequence, until)
        out: list[bytes] = []
        if fetched.gap is not None:
            out.append(gap_frame(fetched.gap.reason, fetched.gap.after, fetched.gap.before))
        out.extend(
            encode(cursor.log_id, event)
            for event in fetched.events
            if visible(sub.principal, sub.filters, event)
        )
        done = fetched.reached >= until or fetched.reached <= cursor.sequence
        sub.catchup = None if done else (Cursor(cursor.log_id, fetched.reached), until)
        sub.outbox.sent += len(out)
        return b"".join(out)
