"""The operational routes: the version document, OpenAPI, health, readiness, metrics.

``GET /`` is what the official SDK negotiates its API version from (it then picks
its events path: generations.py); a browser, which prefers ``text/html``, gets the
dashboard there instead.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request

from . import __version__
from .errors import json_text
from .group import Shared
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .openapi import DOCUMENT as OPENAPI
from .web import prefers_html, ui_response


def ops_blueprint(*, api_version: str, shared: Shared, serve_metrics: bool) -> Blueprint:
    """``serve_metrics``: whether ``/metrics`` is on this listener (not a separate bind).
    Health, readiness and metrics are the process's, or its group's (group.py)."""
    bp = Blueprint("ops", __name__)
    version = {"version": api_version, "manager": "kernel-events-proxy", "proxy": __version__}

    @bp.get("/")
    async def index() -> dict[str, Any] | Response:
        # A browser (it prefers text/html) gets the dashboard; the SDK's `*/*`, JSON.
        if prefers_html(request.headers.get("Accept")):
            return ui_response()
        return version

    @bp.after_app_request
    async def vary_on_accept(response: Response) -> Response:
        if request.path == "/":
            response.vary.add("Accept")
        return response

    @bp.get("/openapi.json")
    async def openapi() -> dict[str, Any]:
        return OPENAPI

    @bp.get("/healthz")
    async def healthz() -> Response:
        return _json(*await shared.health())

    @bp.get("/readyz")
    async def readyz() -> Response:
        return _json(*await shared.readiness())

    if serve_metrics:

        @bp.get("/metrics")
        async def metrics_endpoint() -> Response:
            return Response(await shared.metrics(), content_type=METRICS_CONTENT_TYPE)

    return bp


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(json_text(body), status=status, content_type="application/json")
