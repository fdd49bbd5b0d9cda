"""The API's error answer: an HTTP status and a JSON body that says what was wrong.

``RequestError`` is raised anywhere a request is refused (admission, login, limits);
the app's error handler turns it into ``error_response``. Every other module that
refuses requests imports it from here, so none of them needs the app.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from quart import Response

TITLES: Final = {
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


class RequestError(Exception):
    def __init__(
        self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
        self.headers = dict(headers or {})


def json_text(body: Mapping[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


def error_body(status: int, error: str, detail: str) -> str:
    return json_text(
        {"status": status, "error": error, "title": TITLES.get(status, "Error"), "detail": detail}
    )


def error_response(
    status: int, error: str, detail: str, extra_headers: Mapping[str, str] | None = None
) -> Response:
    response = Response(
        error_body(status, error, detail), status=status, content_type="application/json"
    )
    if status == 401:
        response.headers["WWW-Authenticate"] = "BackendAI"
    response.headers.update(extra_headers or {})
    return response
