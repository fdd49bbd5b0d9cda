"""The browser side's pure decisions: content negotiation and CORS (proxy/web.py)."""

from __future__ import annotations

import pytest

from proxy.web import CORS_MAX_AGE, UI_FILES, Cors, _ui_file, prefers_html

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER, True),
        ("text/html", True),
        ("text/html;q=0.9, application/json;q=0.5", True),
        (None, False),
        ("", False),
        ("*/*", False),  # the SDK (aiohttp) and curl
        ("application/json", False),
        ("application/json, text/html", False),  # a tie keeps the JSON document
        ("text/html;q=0.5, application/json", False),
        ("text/*", False),  # not explicit
        ("text/html;q=0", False),
        ("garbage;;;", False),
    ],
)
def test_only_an_explicit_html_preference_gets_the_page(accept: str | None, html: bool) -> None:
    assert prefers_html(accept) is html


def test_every_ui_file_ships_in_the_package() -> None:
    for name in UI_FILES:
        assert _ui_file(name)
    page = _ui_file("index.html").decode()
    # No CDN, no external fonts, no inline script or style (the CSP forbids them).
    assert "<script>" not in page
    assert "style=" not in page
    for name in UI_FILES:
        assert b"http://" not in _ui_file(name).replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in _ui_file(name)


ALLOWED = Cors(frozenset({"https://dash.example", "http://localhost:3000"}))


def test_cors_headers_only_for_allowed_origins() -> None:
    assert ALLOWED.headers("https://dash.example") == {
        "Access-Control-Allow-Origin": "https://dash.example",
        "Access-Control-Allow-Credentials": "true",
    }
    for other in ("https://evil.example", "https://dash.example.evil", "null", "", None):
        assert ALLOWED.headers(other) == {}
    assert Cors().headers("https://dash.example") == {}


def test_cors_preflight() -> None:
    headers = ALLOWED.preflight("http://localhost:3000", "GET", "Last-Event-ID, Authorization")
    assert headers is not None
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert headers["Access-Control-Allow-Headers"] == "last-event-id, authorization"
    assert "GET" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Max-Age"] == str(CORS_MAX_AGE)
    assert ALLOWED.preflight("https://evil.example", "GET", "") is None
    assert ALLOWED.preflight("https://dash.example", "DELETE", "") is None
    assert ALLOWED.preflight("https://dash.example", "GET", "X-Something-Else") is None
