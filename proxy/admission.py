"""Admission of an event stream: one path for every API generation.

Who is asking (a signature, a session cookie or a bearer token), what they asked for
(the generation's parser turns the query into ``Filters``), where they resume
(``Last-Event-ID``), and whether a stream slot is free. What comes out is a
``StreamPlan``, left in the ASGI scope for guard.py to serve once the request is
answered. The request parsing helpers are pure functions of the raw values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast
from urllib.parse import parse_qs

from quart import Response, request

from .config import Settings
from .errors import RequestError
from .eventid import Cursor, InvalidEventId, parse_id
from .generations import Generation
from .group import Shared
from .limits import StreamLimitExceeded, client_address, parse_networks
from .metrics import Metrics
from .policy import Filters, PolicyError, Principal
from .sessions import JwtVerifier, SessionCodec, authenticate_browser
from .signing import AuthError, Keypair, verify
from .stateread import state_unavailable
from .stream import StreamPlan

log = logging.getLogger(__name__)

MAX_QUERY_FIELDS: Final = 16
# Parameters every generation takes besides its filters.
COMMON_PARAMS: Final = frozenset({"lastEventId", "initialState", "withGroup"})
# The JSON form of the state takes the filters (and the data's shape) only: it has no
# position to resume from.
STATE_PARAMS: Final = frozenset({"withGroup"})
# Headers that authenticate a request must appear once: with two, which one was signed?
_SINGLE_HEADERS: Final = frozenset(
    {"authorization", "date", "x-backendai-date", "host", "content-type", "x-backendai-version"}
)
# Where a request's admitted stream slots are noted, to be given back when it ends.
SLOTS_SCOPE_KEY: Final = "kep.stream_slots"
# Where the events route leaves an admitted stream's plan for guard.serve_streams.
PLAN_SCOPE_KEY: Final = "kep.stream_plan"


# --- Pure parsing -------------------------------------------------------------------


def parse_query(raw: bytes) -> dict[str, list[str]]:
    """The query string's parameters, strictly: valid UTF-8, a bounded number."""
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


def parse_resume(header: Sequence[str], params: Mapping[str, Sequence[str]]) -> Cursor | None:
    """The resume position: the ``Last-Event-ID`` header, else ``lastEventId``."""
    raw = list(header) or list(params.get("lastEventId", []))
    if len(raw) > 1:
        raise RequestError(400, "bad-last-event-id", "Last-Event-ID given more than once")
    if not raw or raw[0] == "":
        return None  # an empty Last-Event-ID means "no id yet" (WHATWG)
    try:
        return parse_id(raw[0])
    except InvalidEventId as exc:
        raise RequestError(400, "bad-last-event-id", str(exc)) from None


def parse_flag(params: Mapping[str, Sequence[str]], name: str) -> bool:
    """A ``true``/``false`` parameter, false when absent: ``initialState`` (the state
    first, resyncs instead of gaps), ``withGroup`` (``group`` in every event's data)."""
    values = set(params.get(name, ()))
    if not values:
        return False
    if len(values) > 1 or not values <= {"true", "false"}:
        raise RequestError(400, "bad-parameter", f"parameter {name!r} must be true or false")
    return values == {"true"}


def auth_headers(raw_headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-cased headers, each authenticating one at most once."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1").lower()
        if name in headers and name in _SINGLE_HEADERS:
            raise RequestError(400, "duplicate-header", f"header {name!r} appears twice")
        headers[name] = raw_value.decode("latin-1")
    if "host" not in headers and ":authority" in headers:
        headers["host"] = headers[":authority"]  # HTTP/2 carries the host here
    return headers


def raw_target(scope: Mapping[str, Any]) -> str:
    """The request target exactly as the client sent it (what it signed)."""
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope["query_string"]
    target = raw_path + (b"?" + query if query else b"")
    return target.decode("latin-1")


# --- The shell ----------------------------------------------------------------------


class Admission:
    """Authenticates requests and admits event streams (in the current quart request)."""

    def __init__(
        self,
        settings: Settings,
        keypairs: Mapping[str, Keypair],
        metrics: Metrics,
        *,
        codec: SessionCodec | None,
        bearer: JwtVerifier | None,
        shared: Shared,
        state_available: Callable[[], bool] = lambda: True,
    ) -> None:
        self._state_available = state_available
        self._settings = settings
        # The live key set (reloaded from the keypairs file), or the configured one.
        self.keypairs = keypairs
        self._metrics = metrics
        self._codec = codec
        self._bearer = bearer
        self._skew = timedelta(seconds=settings.auth.max_clock_skew)
        # Stream slots: this process's, or its group's (group.py).
        self._shared = shared
        self._trusted_proxies = parse_networks(settings.limits.trusted_proxies)

    def remote_client(self) -> str:
        return client_address(
            request.remote_addr, request.headers.getlist("X-Forwarded-For"), self._trusted_proxies
        )

    def authenticate(self) -> Principal:
        headers = auth_headers(request.scope["headers"])
        lookup = self.keypairs.get
        try:
            browser = authenticate_browser(
                headers.get("authorization"),
                request.cookies.get(self._settings.session.cookie_name),
                bearer=self._bearer,
                codec=self._codec,
                lookup=lookup,
            )
            if browser is not None:
                return browser
            return verify(
                method=request.method,
                raw_target=raw_target(request.scope),
                headers=headers,
                lookup=lookup,
                now=datetime.now(UTC),
                max_skew=self._skew,
            )
        except AuthError as exc:
            self._metrics.auth_failures[exc.reason] += 1
            log.info("auth failure (%s) from %s", exc.reason, request.remote_addr)
            raise RequestError(401, exc.reason, exc.message) from None

    def _parse(
        self, generation: Generation, common: frozenset[str]
    ) -> tuple[Principal, dict[str, list[str]], Filters]:
        """Who asks, and the generation's filters from the query (``common``: the other
        parameters this route takes besides them)."""
        principal = self.authenticate()
        params = parse_query(request.scope["query_string"])
        try:
            filters = generation.parse(principal, params, common)
        except PolicyError as exc:
            raise RequestError(
                exc.status, "forbidden" if exc.status == 403 else "bad-parameter", exc.message
            ) from None
        if parse_flag(params, "withGroup"):
            filters = replace(filters, payload=filters.payload.with_group())
        return principal, params, filters

    def _require_state(self) -> None:
        if not self._state_available():
            raise state_unavailable()

    def admit_state(self, generation: Generation) -> tuple[Principal, Filters]:
        """The JSON form of the state (``GET <stream path>/state``): the stream's
        authentication and filters, and the same refusal without a snapshot."""
        principal, _, filters = self._parse(generation, STATE_PARAMS)
        self._require_state()
        return principal, filters

    async def open_stream(self, generation: Generation) -> Response:
        """The events route of one generation: admit the stream, or raise RequestError."""
        principal, params, filters = self._parse(generation, COMMON_PARAMS)
        cursor = parse_resume(request.headers.getlist("Last-Event-ID"), params)
        initial_state = parse_flag(params, "initialState")
        if initial_state:
            self._require_state()
        await self._take_slot(principal)
        # Clients that declare they speak text/event-stream (EventSource always does) get
        # id-only position blocks; the official SDK sends `*/*` and would turn such a
        # block into an empty "message" event.
        positions = "text/event-stream" in request.headers.get("Accept", "")
        if request.method == "GET":
            # Admitted: the stream itself is served once this request is over (see
            # guard.serve_streams). A HEAD gets the same head and no body.
            cast(dict[str, Any], request.scope)[PLAN_SCOPE_KEY] = StreamPlan(
                principal,
                filters,
                cursor,
                positions,
                request.remote_addr,
                generation.name,
                initial_state,
            )
        response = Response(b"", content_type="text/event-stream; charset=utf-8")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        return response

    async def _take_slot(self, principal: Principal) -> None:
        # A slot is taken now, while the request is handled (concurrent requests cannot
        # all pass the check before one subscribes: one ledger decides each at once),
        # and given back when the request ends (guard.py).
        try:
            await self._shared.acquire_stream(principal.access_key)
        except StreamLimitExceeded as exc:
            log.info(
                "stream refused (%s): %s from %s",
                exc.error,
                principal.access_key,
                self.remote_client(),
            )
            raise RequestError(
                exc.status, exc.error, exc.detail, {"Retry-After": str(exc.retry_after)}
            ) from None
        cast(dict[str, Any], request.scope).setdefault(SLOTS_SCOPE_KEY, []).append(
            principal.access_key
        )
