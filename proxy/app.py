"""The HTTP shell: a quart-trio app composed from small modules.

- admission.py: authentication, limits, the resume cursor: one path for every API
  generation (generations.py), each of which only brings its parameter parser;
- web.py: sign-in, the dashboard's files, CORS; ops.py: ``/``, health, metrics;
- guard.py: around every ASGI call, serving admitted streams bare (stream.py);
- errors.py: the JSON error answer every refusal gets.

Every decision is delegated to a pure core (signing, policy, eventid, payloads).
"""

from __future__ import annotations

from collections.abc import Mapping

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import stateread
from .admission import Admission
from .config import LimitsSettings, Settings
from .errors import RequestError, error_response
from .generations import GENERATIONS, Generation
from .group import Shared, SingleProcess
from .guard import guard_asgi
from .hub import Hub
from .metrics import Metrics
from .ops import ops_blueprint
from .signing import Keypair
from .stream import StreamWriter
from .upstream import UpstreamBridge
from .web import Cors, LoginLimits, browser_blueprint, jwt_verifier, session_codec

# Answers counted as refused by an abuse limit (kep_limited_requests).
_LIMIT_STATUSES = frozenset({408, 414, 429, 431, 503})


def create_app(
    settings: Settings,
    hub: Hub,
    bridge: UpstreamBridge,
    metrics: Metrics,
    keys: Mapping[str, Keypair] | None = None,
    *,
    shared: Shared | None = None,
) -> QuartTrio:
    """``shared``: the group this process is a worker of (its limits, metrics and
    health are the group's); by default the process serves alone."""
    app = QuartTrio(__name__)
    if shared is None:
        shared = SingleProcess(settings.limits, metrics, bridge)
    # No deadline on writing an answer: a slow reader is the kernel write timeout's to
    # end (server.py). Event streams are served outside quart (guard.py).
    app.config["RESPONSE_TIMEOUT"] = None
    codec = session_codec(settings.session)
    admission = Admission(
        settings,
        keys if keys is not None else settings.keypair_index(),
        metrics,
        codec=codec,
        bearer=jwt_verifier(settings.jwt),
        shared=shared,
        state_available=lambda: not hub.state_unavailable,
    )
    _install_error_handlers(app, metrics, settings.limits)
    app.register_blueprint(
        ops_blueprint(
            api_version=settings.api.version,
            shared=shared,
            serve_metrics=settings.server.metrics_bind is None,
        )
    )
    app.register_blueprint(
        browser_blueprint(
            lookup=lambda access_key: admission.keypairs.get(access_key),
            session=settings.session,
            codec=codec,
            cors=Cors(frozenset(settings.server.cors_origins)),
            on_auth_failure=lambda reason: metrics.auth_failures.update([reason]),
            login_limits=LoginLimits(
                shared=shared,
                body_timeout=settings.limits.body_timeout,
                client=admission.remote_client,
            ),
        )
    )
    for generation in GENERATIONS:
        _add_stream_route(app, admission, generation)
        _add_state_route(app, admission, hub, generation, settings.upstream.connect_timeout)
    hub.on_write = metrics.delivery_latency.observe
    writer = StreamWriter(hub, bridge.fetch, metrics)
    app.asgi_app = guard_asgi(app.asgi_app, shared.release_stream, writer)  # type: ignore[method-assign,assignment]
    return app


def _add_stream_route(app: QuartTrio, admission: Admission, generation: Generation) -> None:
    async def open_stream() -> Response:
        return await admission.open_stream(generation)

    app.add_url_rule(generation.path, f"events_{generation.name}", open_stream, methods=["GET"])


def _add_state_route(
    app: QuartTrio, admission: Admission, hub: Hub, generation: Generation, wait: float
) -> None:
    async def read_state() -> Response:
        principal, filters = admission.admit_state(generation)
        body = await stateread.read(hub, principal, filters, wait)
        return Response(body, content_type="application/json")

    app.add_url_rule(generation.state_path, f"state_{generation.name}", read_state, methods=["GET"])


def _install_error_handlers(app: QuartTrio, metrics: Metrics, limits: LimitsSettings) -> None:
    @app.errorhandler(RequestError)
    async def on_request_error(exc: RequestError) -> Response:
        if exc.status in _LIMIT_STATUSES:
            metrics.limited[exc.error] += 1
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        return error_response(
            code, (exc.name or "error").lower().replace(" ", "-"), exc.description or ""
        )

    @app.before_request
    async def check_sizes() -> None:
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
