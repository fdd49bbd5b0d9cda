"""The browser side: login and logout, the dashboard's files, CORS.

Decisions are pure functions (``prefers_html``, ``Cors``); ``browser_blueprint`` wires
them and ``sessions`` into Quart routes, and ``app.create_app`` registers it:

- ``POST /server/login``: JSON credentials -> a session cookie (``sessions.SessionCodec``)
- ``POST /server/logout``: clears it; ``GET /server/session``: who the cookie names
- ``GET /ui/`` and ``/ui/<file>``: the dashboard, files shipped in ``proxy/ui``
- CORS for the configured origins only, on every route (preflights answered here)

The dashboard is a static page: it logs in, then reads the ordinary event stream with
``EventSource`` (which cannot sign requests, hence the cookie).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final
from urllib.parse import urlsplit

import trio
from quart import Blueprint, Response, request
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from .config import SESSION_MODE_TEXT, JwtSettings, SessionSettings, session_mode
from .errors import RequestError
from .group import Shared
from .limits import retry_after_header
from .policy import Principal
from .sessions import (
    MAX_LOGIN_BODY,
    JwtVerifier,
    LoginRequestError,
    Lookup,
    SessionCodec,
    check_credentials,
    parse_login,
)
from .signing import AuthError

log = logging.getLogger(__name__)

# The only files served under /ui/: no path from the request ever reaches the disk.
UI_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Everything comes from this origin: no CDN, no inline script or style, no framing.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_CORS_METHODS: Final = ("GET", "POST", "OPTIONS")
# Request headers a cross-origin caller may send: the SDK's signing headers, a bearer
# token, the JSON login body's type, and EventSource's resume header.
_CORS_HEADERS: Final = frozenset(
    {
        "authorization",
        "content-type",
        "date",
        "x-backendai-date",
        "x-backendai-version",
        "last-event-id",
        "accept",
        "cache-control",
    }
)
CORS_MAX_AGE: Final = 600


def session_codec(settings: SessionSettings) -> SessionCodec | None:
    """The cookie codec, or None when browser sign-in is off.

    Without a configured key one is made here, at start-up, and a warning says what
    that means: only this process accepts the cookies it issues.
    """
    mode = session_mode(settings)
    if mode == "off":
        return None
    if settings.secret_key is None:
        log.warning("browser sign-in: %s", SESSION_MODE_TEXT[mode])
        return SessionCodec(secrets.token_urlsafe(32), settings.max_age)
    return SessionCodec(settings.secret_key.get_secret_value(), settings.max_age)


def jwt_verifier(settings: JwtSettings) -> JwtVerifier | None:
    """The bearer token verifier, or None when no key is configured (no tokens)."""
    if settings.key is None:
        return None
    return JwtVerifier(
        settings.key.get_secret_value(),
        settings.algorithms,
        issuer=settings.issuer,
        audience=settings.audience,
        leeway=settings.leeway,
    )


# --- Content negotiation --------------------------------------------------------------


def prefers_html(accept: str | None) -> bool:
    """Does this ``Accept`` explicitly prefer ``text/html`` to JSON (a browser)?

    ``*/*`` (the SDK's) or no header at all mean JSON; so does a tie: only a request
    that names ``text/html`` with a higher quality than JSON gets the page.
    """
    if not accept:
        return False
    parsed = parse_accept_header(accept, MIMEAccept)
    html = max((q for value, q in parsed if value.lower() == "text/html"), default=0.0)
    return html > 0 and html > parsed["application/json"]


@cache
def _ui_file(name: str) -> bytes:
    return resources.files("proxy").joinpath("ui", name).read_bytes()


def ui_response(name: str = "index.html") -> Response:
    """One of the dashboard's files, with the page's security headers."""
    response = Response(_ui_file(name), content_type=UI_FILES[name])
    response.headers.update(_PAGE_HEADERS)
    return response


# --- CORS -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cors:
    """Cross-origin access with credentials, for the configured origins only."""

    origins: frozenset[str] = frozenset()

    def allows(self, origin: str | None) -> bool:
        return origin is not None and origin.lower() in self.origins

    def headers(self, origin: str | None) -> dict[str, str]:
        """For an ordinary response: nothing unless the origin is allowed."""
        if not self.allows(origin):
            return {}
        assert origin is not None
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}

    def preflight(
        self, origin: str | None, method: str, request_headers: str
    ) -> dict[str, str] | None:
        """Headers answering an ``OPTIONS`` preflight, or None to refuse it."""
        if not self.allows(origin) or method.upper() not in _CORS_METHODS:
            return None
        asked = [h.strip().lower() for h in request_headers.split(",") if h.strip()]
        if any(h not in _CORS_HEADERS for h in asked):
            return None
        headers = self.headers(origin) | {
            "Access-Control-Allow-Methods": ", ".join(_CORS_METHODS),
            "Access-Control-Max-Age": str(CORS_MAX_AGE),
        }
        if asked:
            headers["Access-Control-Allow-Headers"] = ", ".join(asked)
        return headers


def _add_vary(response: Response, names: Iterable[str]) -> None:
    present = {v.strip().lower() for v in response.headers.get("Vary", "").split(",") if v}
    for name in names:
        if name.lower() not in present:
            response.headers.add("Vary", name)


# --- Login limits ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoginLimits:
    """How much login guessing is tolerated (``[limits]``; see ``limits.Ledger``).

    Every attempt counts against the client's address; only failed ones against the
    access key, so its owner can still sign in while nobody is guessing at it. Unknown
    access keys are tracked like real ones: a 429 says nothing about which keys exist.
    The buckets are the process's, or its group's (``shared``).
    """

    shared: Shared
    body_timeout: float
    client: Callable[[], str]  # the requesting client's address


def _origin_host(origin: str) -> str | None:
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:  # e.g. "http://[" (an unclosed IPv6 literal)
        return None


# --- The blueprint --------------------------------------------------------------------


def browser_blueprint(
    *,
    lookup: Lookup,
    session: SessionSettings,
    codec: SessionCodec | None,
    cors: Cors,
    on_auth_failure: Callable[[str], None],
    login_limits: LoginLimits,
) -> Blueprint:
    """Login, logout, the dashboard's files and CORS, as one blueprint."""
    bp = Blueprint("browser", __name__)
    cookie = session.cookie_name

    def secure() -> bool:
        # Secure when the request came over TLS, unless the settings say otherwise
        # (TLS ended at a reverse proxy: set cookie_secure = true).
        if session.cookie_secure is not None:
            return session.cookie_secure
        return bool(request.scope.get("scheme") == "https")

    def same_site_post() -> None:
        """A POST must come from this origin or an allowed one (defence against CSRF)."""
        origin = request.headers.get("Origin")
        if origin is None or cors.allows(origin):
            return
        if _origin_host(origin) != request.headers.get("Host", "").lower():
            raise RequestError(403, "bad-origin", f"requests from {origin[:100]} are not allowed")

    def set_cookie(response: Response, value: str, max_age: int) -> None:
        response.set_cookie(
            cookie,
            value,
            max_age=max_age,
            path="/",
            secure=secure(),
            httponly=True,
            samesite="Lax",
        )

    def json_response(body: Mapping[str, Any], status: int = 200) -> Response:
        text = json.dumps(body, separators=(",", ":"))
        response = Response(text, status=status, content_type="application/json")
        response.headers["Cache-Control"] = "no-store"
        return response

    async def read_body() -> bytes:
        if (request.content_length or 0) > MAX_LOGIN_BODY:
            raise RequestError(
                400, "body-too-large", f"the login body is larger than {MAX_LOGIN_BODY} bytes"
            )
        data = bytearray()
        # Quart waits for a body forever: a client trickling one (a slowloris on the
        # body) would hold its connection and this task as long as it liked.
        with trio.move_on_after(login_limits.body_timeout) as waited:
            async for chunk in request.body:
                data += chunk
                if len(data) > MAX_LOGIN_BODY:
                    raise RequestError(
                        400,
                        "body-too-large",
                        f"the login body is larger than {MAX_LOGIN_BODY} bytes",
                    )
        if waited.cancelled_caught:
            raise RequestError(
                408,
                "body-timeout",
                f"the request body did not arrive within {login_limits.body_timeout:g} s "
                "(limits.body_timeout)",
            )
        return bytes(data)

    def sign_in_off() -> RequestError:
        return RequestError(
            404, "sessions-disabled", "browser sign-in is off on this server (session.enabled)"
        )

    def too_many(error: str, detail: str, wait: float) -> RequestError:
        seconds = retry_after_header(wait)
        return RequestError(429, error, f"{detail}: retry in {seconds} s", {"Retry-After": seconds})

    @bp.post("/server/login")
    async def login() -> Response:
        same_site_post()
        if codec is None:
            raise sign_in_off()
        address = login_limits.client()
        wait = await login_limits.shared.login_attempt(address)
        if wait:
            log.info("login refused: too many attempts from %s", address)
            raise too_many("too-many-attempts", "too many login attempts from this address", wait)
        try:
            credentials = parse_login(await read_body(), request.headers.get("Content-Type"))
        except LoginRequestError as exc:
            raise RequestError(exc.status, exc.error, exc.detail) from None
        wait = await login_limits.shared.login_wait(credentials.access_key)
        if wait:
            log.info("login refused: too many failures for %s", credentials.access_key[:128])
            raise too_many("too-many-failures", "too many failed logins for this access key", wait)
        try:
            keypair = check_credentials(credentials.access_key, credentials.secret_key, lookup)
        except AuthError as exc:
            login_limits.shared.login_failed(credentials.access_key)
            on_auth_failure(exc.reason)
            log.info("login failure (%s) from %s", exc.reason, address)
            raise RequestError(401, exc.reason, exc.message) from None
        p = keypair.principal
        log.info("login: %s (%s) from %s", p.access_key, p.role, request.remote_addr)
        response = json_response(_principal_json(p) | {"expires_in": codec.max_age})
        set_cookie(response, codec.issue(keypair), codec.max_age)
        return response

    @bp.post("/server/logout")
    async def logout() -> Response:
        same_site_post()
        # The cookie is stateless: logging out removes it from this browser. A copy
        # taken before stays valid until it expires (or its keypair is removed).
        response = json_response({"status": "logged-out"})
        set_cookie(response, "", 0)
        return response

    @bp.get("/server/session")
    async def whoami() -> Response:
        token = request.cookies.get(cookie)
        if codec is None:
            raise sign_in_off()
        if token is None:
            raise RequestError(401, "missing", "not logged in")
        try:
            principal = codec.verify(token, lookup)
        except AuthError as exc:
            raise RequestError(401, exc.reason, exc.message) from None
        return json_response(_principal_json(principal) | {"expires_in": codec.max_age})

    @bp.get("/ui/")
    async def ui_index() -> Response:
        return ui_response()

    @bp.get("/ui/<name>")
    async def ui_file(name: str) -> Response:
        if name not in UI_FILES:
            raise RequestError(404, "not-found", f"no such file: {name[:100]}")
        return ui_response(name)

    @bp.before_app_request
    async def cors_preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        origin = request.headers.get("Origin")
        headers = cors.preflight(
            origin,
            request.headers.get("Access-Control-Request-Method", ""),
            request.headers.get("Access-Control-Request-Headers", ""),
        )
        if headers is None:
            raise RequestError(403, "cors-refused", "this cross-origin request is not allowed")
        response = Response("", status=204)
        response.headers.update(headers)
        return response

    @bp.after_app_request
    async def cors_headers(response: Response) -> Response:
        if cors.origins:
            origin = request.headers.get("Origin")
            response.headers.update(cors.headers(origin))
            _add_vary(response, ["Origin"])
            if request.method == "OPTIONS":
                _add_vary(
                    response, ["Access-Control-Request-Method", "Access-Control-Request-Headers"]
                )
        return response

    return bp


def _principal_json(p: Principal) -> dict[str, str]:
    return {
        "access_key": p.access_key,
        "role": p.role.value,
        "domain": p.domain,
        "user_id": p.user_id,
    }
