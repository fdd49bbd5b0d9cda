"""The HTTP shell: a quart-trio app wiring authentication, policy and the hub.

Every decision is delegated to a pure core (signing, policy, eventid); this module
only reads the request, maps errors to JSON answers, and writes the outbox to the
socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import parse_qs

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import __version__, sse
from .config import Settings
from .eventid import Cursor, InvalidEventId, parse_id
from .hub import Hub, Subscription, encode, gap_frame
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .openapi import DOCUMENT as OPENAPI
from .policy import Filters, PolicyError, Principal, resolve_filters, visible
from .sessions import authenticate_browser
from .signing import AuthError, Keypair, verify
from .upstream import Fetched, UpstreamBridge
from .web import Cors, browser_blueprint, jwt_verifier, prefers_html, session_codec, ui_response

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


class RequestError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail: str) -> Response:
    titles = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not Found",
        415: "Unsupported Media Type",
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
    # Browsers and token holders: session cookies and bearer JWTs (sessions.py, web.py).
    codec, bearer = session_codec(settings.session), jwt_verifier(settings.jwt)

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
        return error_response(exc.status, exc.error, exc.detail)

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
        # Clients that declare they speak text/event-stream (EventSource always does) get
        # id-only position blocks; the official SDK sends `*/*` and would turn such a
        # block into an empty "message" event.
        positions = "text/event-stream" in request.headers.get("Accept", "")
        body = writer.stream(principal, filters, cursor, positions, request.remote_addr)
        response = Response(body, content_type="text/event-stream; charset=utf-8")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    return app


def _raw_target(scope: Mapping[str, Any]) -> str:
    """The request target exactly as the client sent it (what it signed)."""
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope["query_string"]
    target = raw_path + (b"?" + query if query else b"")
    return target.decode("latin-1")


@dataclass
class _Tally:
    events: int = 0


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
    ) -> AsyncIterator[bytes]:
        hub = self.hub
        started = time.monotonic()
        tally = _Tally()
        with hub.subscribe(principal, filters, cursor, positions=positions) as sub:
            # Taken with the subscription, atomically: everything up to here is not
            # this client's to receive, so a reconnect from here loses nothing.
            start = hub.position() if positions and cursor is None else None
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
            try:
                if start is not None:
                    yield sse.encode_position(start)
                async for chunk in self._frames(sub, tally):
                    yield chunk
            finally:
                duration = round(time.monotonic() - started, 3)
                reason = sub.outbox.reason or "client-gone"
                log.info(
                    "stream closed: %s after %.1fs, %d events sent, reason=%s",
                    principal.access_key,
                    duration,
                    tally.events,
                    reason,
                    extra={
                        "event": "stream_close",
                        **fields,
                        "duration_s": duration,
                        "events_sent": tally.events,
                        "reason": reason,
                    },
                )

    async def _frames(self, sub: Subscription, tally: _Tally) -> AsyncIterator[bytes]:
        outbox = sub.outbox
        while True:
            # Heartbeats arrive through the outbox too (Hub.run_heartbeats).
            frames = [] if sub.catchup is not None else await outbox.take()
            # A catch-up (set at subscribe time, or by the first publish after it)
            # comes before anything queued: those events are older.
            while sub.catchup is not None:
                chunk, count = await self._catch_up(sub)
                tally.events += count
                if chunk:
                    yield chunk
            if frames:
                self.metrics.delivery_latency.observe(time.monotonic() - outbox.since)
                tally.events += len(frames) - outbox.taken_beats
                # Coalesce: everything queued goes out in one write.
                yield frames[0] if len(frames) == 1 else b"".join(frames)
            if outbox.closed and not len(outbox):
                return

    async def _catch_up(self, sub: Subscription) -> tuple[bytes, int]:
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
        return b"".join(out), len(out)
