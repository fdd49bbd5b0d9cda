"""Browser authentication over real sockets: login, session cookies, bearer JWTs, CORS,
and the page/JSON negotiation at ``GET /``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from typing import Any

import httpx
import jwt
import pytest
import trio

from proxy.app import create_app
from proxy.config import Settings
from proxy.hub import Hub
from proxy.metrics import Metrics
from proxy.server import RunningProxy, run_proxy
from proxy.upstream import UpstreamBridge
from proxy.upstream_server import UpstreamServer

from ..conftest import make_settings
from ..helpers import (
    ADMIN,
    ALL_KEYS,
    EVENTS_PATH,
    SUPER,
    USER1,
    USER1B,
    USER2,
    Key,
    SSEReader,
    lifecycle,
    signed_headers,
    wait_until,
)

SESSION_KEY = "test-session-signing-key-" + "s" * 20
JWT_KEY = "test-jwt-hmac-key-" + "j" * 30
DASH = "https://dash.example"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def browser_settings(
    target: str,
    sections: dict[str, dict[str, Any]] | None = None,
    *,
    keys: tuple[Key, ...] = ALL_KEYS,
) -> Settings:
    """Settings with sessions, bearer tokens and one CORS origin; ``sections`` on top."""
    data = make_settings(target).model_dump(mode="python")
    data["keypairs"] = [k.settings().model_dump() | {"secret_key": k.secret_key} for k in keys]
    data["server"]["cors_origins"] = [DASH]
    data["session"] = {"secret_key": SESSION_KEY, "max_age": 3600}
    data["jwt"] = {"key": JWT_KEY}
    for name, values in (sections or {}).items():
        data[name] = data.get(name, {}) | values
    return Settings.model_validate(data)


@asynccontextmanager
async def serving(nursery: trio.Nursery, settings: Settings) -> AsyncIterator[str]:
    running: RunningProxy = await nursery.start(run_proxy, settings)
    await wait_until(lambda: running.bridge.live)
    try:
        yield running.url
    finally:
        running.shutdown()


@pytest.fixture
async def url(upstream: UpstreamServer, nursery: trio.Nursery) -> AsyncIterator[str]:
    async with serving(nursery, browser_settings(upstream.target)) as base:
        yield base


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as c:
        yield c


async def login(client: httpx.AsyncClient, url: str, key: Any, **headers: str) -> httpx.Response:
    return await client.post(
        f"{url}/server/login",
        json={"access_key": key.access_key, "secret_key": key.secret_key},
        headers=headers,
    )


def set_cookie(response: httpx.Response) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


def assert_json_error(
    response: httpx.Response, status: int, error: str, fragment: str = ""
) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"status", "error", "title", "detail"}
    assert (body["status"], body["error"]) == (status, error)
    assert fragment in body["detail"]


# --- Login and logout -----------------------------------------------------------------


async def test_login_sets_an_httponly_lax_session_cookie(
    url: str, client: httpx.AsyncClient
) -> None:
    response = await login(client, url, ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "access_key": ADMIN.access_key,
        "role": "admin",
        "domain": ADMIN.domain,
        "user_id": ADMIN.user_id,
        "expires_in": 3600,
    }
    assert response.headers["cache-control"] == "no-store"
    morsel = set_cookie(response)["kep_session"]
    assert morsel.value
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["path"] == "/"
    assert morsel["max-age"] == "3600"
    assert not morsel["secure"]  # plain HTTP here; see the TLS test below
    assert ADMIN.secret_key not in response.headers["set-cookie"]
    who = await client.get(f"{url}/server/session")
    assert who.status_code == 200
    assert who.json()["access_key"] == ADMIN.access_key


async def test_wrong_credentials_are_one_401_whether_or_not_the_key_exists(
    url: str, client: httpx.AsyncClient
) -> None:
    wrong_secret = await client.post(
        f"{url}/server/login", json={"access_key": USER1.access_key, "secret_key": "nope"}
    )
    unknown_key = await client.post(
        f"{url}/server/login", json={"access_key": "AKNOBODY", "secret_key": "nope"}
    )
    for response in (wrong_secret, unknown_key):
        assert_json_error(response, 401, "bad-credentials", "access key or secret key is wrong")
        assert "set-cookie" not in response.headers
    assert wrong_secret.content == unknown_key.content


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error"),
    [
        (b"{not json", "application/json", 400, "bad-json"),
        (b'{"access_key": "AKUSER1"}', "application/json", 400, "missing-field"),
        (b'{"access_key": 7, "secret_key": "x"}', "application/json", 400, "bad-field"),
        (b'["AKUSER1", "x"]', "application/json", 400, "bad-body"),
        (b'{"access_key": "A", "secret_key": "' + b"x" * 5000 + b'"}', "application/json", 400,
         "body-too-large"),
        (b'{"access_key": "AKUSER1", "secret_key": "x"}', "text/plain", 415,
         "unsupported-media-type"),
    ],
)  # fmt: skip
async def test_malformed_login_is_400_naming_the_problem(
    url: str, client: httpx.AsyncClient, body: bytes, content_type: str, status: int, error: str
) -> None:
    response = await client.post(
        f"{url}/server/login", content=body, headers={"Content-Type": content_type}
    )
    assert_json_error(response, status, error)


async def test_oversized_chunked_login_is_400(url: str, client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    response = await client.post(
        f"{url}/server/login", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_json_error(response, 400, "body-too-large")


async def test_logout_clears_the_cookie(url: str, client: httpx.AsyncClient) -> None:
    assert (await login(client, url, USER1)).status_code == 200
    response = await client.post(f"{url}/server/logout")
    assert response.status_code == 200
    assert response.json() == {"status": "logged-out"}
    morsel = set_cookie(response)["kep_session"]
    assert (morsel.value, morsel["max-age"], morsel["httponly"]) == ("", "0", True)
    assert_json_error(await client.get(f"{url}/server/session"), 401, "missing")
    assert_json_error(await client.get(f"{url}{EVENTS_PATH}"), 401, "missing")


async def test_login_from_a_foreign_origin_is_403(url: str, client: httpx.AsyncClient) -> None:
    response = await login(client, url, USER1, Origin="https://evil.example")
    assert_json_error(response, 403, "bad-origin")
    assert "set-cookie" not in response.headers
    same_origin = await login(client, url, USER1, Origin=url)
    assert same_origin.status_code == 200
    allowed = await login(client, url, USER1, Origin=DASH)
    assert allowed.status_code == 200


async def test_without_a_signing_key_sign_in_works_with_a_generated_one(
    upstream: UpstreamServer,
    nursery: trio.Nursery,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = browser_settings(upstream.target, {"session": {"secret_key": None}})
    async with serving(nursery, settings) as base:
        response = await login(client, base, USER1)
        assert response.status_code == 200, response.text
        assert (await client.get(f"{base}/server/session")).json()["access_key"] == (
            USER1.access_key
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("sessions end when this process restarts" in w for w in warnings), warnings
    # A second process makes its own key: the first one's cookie means nothing there.
    async with serving(nursery, settings) as other:
        assert client.cookies["kep_session"] == response.cookies["kep_session"]
        refused = await client.get(f"{other}/server/session")
        assert_json_error(refused, 401, "bad-session")


async def test_sign_in_off_when_disabled(
    upstream: UpstreamServer, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    settings = browser_settings(upstream.target, {"session": {"enabled": False}})
    async with serving(nursery, settings) as base:
        assert_json_error(await login(client, base, USER1), 404, "sessions-disabled")
        assert_json_error(await client.get(f"{base}/server/session"), 404, "sessions-disabled")


async def test_secure_cookie_over_tls_and_when_configured(upstream: UpstreamServer) -> None:
    # TLS is the ASGI scope's scheme; Quart's test client sets it without certificates.
    for sections, scheme, secure in [
        ({}, "https", True),
        ({}, "http", False),
        ({"session": {"cookie_secure": True}}, "http", True),
        ({"session": {"cookie_secure": False}}, "https", False),
    ]:
        settings = browser_settings(upstream.target, sections)
        hub = Hub(history_size=10, outbox_limit=10)
        bridge = UpstreamBridge(settings.upstream, hub)
        app = create_app(settings, hub, bridge, Metrics(hub, bridge))
        response = await app.test_client().post(
            "/server/login",
            json={"access_key": USER1.access_key, "secret_key": USER1.secret_key},
            scheme=scheme,
        )
        assert response.status_code == 200
        morsel = set_cookie_from(response.headers.get("Set-Cookie", ""))["kep_session"]
        assert bool(morsel["secure"]) is secure, (sections, scheme)


def set_cookie_from(header: str) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(header)
    return cookie


# --- The stream with a cookie ---------------------------------------------------------


async def read_ids(reader: SSEReader, n: int) -> list[tuple[str | None, str]]:
    frames = await reader.take(n)
    return [(f.event, f.data["sessionId"]) for f in frames]


async def test_stream_accepts_the_cookie_with_the_same_visibility(
    url: str, client: httpx.AsyncClient, upstream: UpstreamServer
) -> None:
    assert (await login(client, url, USER1)).status_code == 200
    async with client.stream("GET", f"{url}{EVENTS_PATH}") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        reader = SSEReader(response)
        upstream.log.append(
            [
                lifecycle("kernel_started", "theirs", USER2),
                lifecycle("kernel_started", "admins", ADMIN),
                lifecycle("kernel_started", "mine", USER1),
                lifecycle("kernel_started", "same-user", USER1B),
            ]
        )
        assert await read_ids(reader, 2) == [
            ("kernel_started", "mine"),
            ("kernel_started", "same-user"),
        ]


async def test_cookie_user_naming_another_owner_is_still_403(
    url: str, client: httpx.AsyncClient
) -> None:
    assert (await login(client, url, USER1)).status_code == 200
    response = await client.get(f"{url}{EVENTS_PATH}?ownerAccessKey={USER2.access_key}")
    assert_json_error(response, 403, "forbidden")


async def test_cookie_survives_a_restart_and_works_on_every_replica_with_the_key(
    upstream: UpstreamServer, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    async with serving(nursery, browser_settings(upstream.target)) as first:
        assert (await login(client, first, SUPER)).status_code == 200
    cookie = client.cookies["kep_session"]
    # A restarted proxy, or another replica: same signing key, no shared state.
    async with (
        serving(nursery, browser_settings(upstream.target)) as second,
        httpx.AsyncClient(cookies={"kep_session": cookie}) as other,
    ):
        assert (await other.get(f"{second}/server/session")).json()["role"] == "superadmin"
        async with other.stream("GET", f"{second}{EVENTS_PATH}") as response:
            assert response.status_code == 200
    # Another key: refused. The keypair removed from the configuration: refused.
    other_key = browser_settings(upstream.target, {"session": {"secret_key": "x" * 40}})
    without = browser_settings(upstream.target, keys=tuple(k for k in ALL_KEYS if k != SUPER))
    for settings, reason in [(other_key, "bad-session"), (without, "session-revoked")]:
        async with (
            serving(nursery, settings) as base,
            httpx.AsyncClient(cookies={"kep_session": cookie}) as other,
        ):
            assert_json_error(await other.get(f"{base}{EVENTS_PATH}"), 401, reason)


async def test_signed_requests_still_win_over_a_cookie(url: str, client: httpx.AsyncClient) -> None:
    assert (await login(client, url, SUPER)).status_code == 200
    # A badly signed request (no date, here) is refused though a valid cookie came with it.
    response = await client.get(
        f"{url}{EVENTS_PATH}",
        headers={
            "Authorization": f"BackendAI signMethod=HMAC-SHA256, credential=AKSUPER:{'0' * 64}"
        },
    )
    assert_json_error(response, 401, "bad-date")


# --- Bearer JWTs ----------------------------------------------------------------------


def bearer(**claims: Any) -> dict[str, str]:
    payload = {
        "sub": "AKIDP1",
        "role": "superadmin",
        "user_id": "idp-1",
        "domain": "default",
        # Made at collection time, long before the test may run: not too short-lived.
        "exp": int(time.time()) + 3600,
    } | claims
    payload = {k: v for k, v in payload.items() if v is not None}
    return {"Authorization": f"Bearer {jwt.encode(payload, JWT_KEY, algorithm='HS256')}"}


async def test_bearer_jwt_streams_with_its_claims(
    url: str, client: httpx.AsyncClient, upstream: UpstreamServer
) -> None:
    headers = bearer(role="user", user_id=USER2.user_id, sub=USER2.access_key)
    async with client.stream("GET", f"{url}{EVENTS_PATH}", headers=headers) as response:
        assert response.status_code == 200
        reader = SSEReader(response)
        upstream.log.append(
            [lifecycle("kernel_started", "u1", USER1), lifecycle("kernel_started", "u2", USER2)]
        )
        assert await read_ids(reader, 1) == [("kernel_started", "u2")]


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        (bearer(exp=int(time.time()) - 5), "token-expired"),
        (bearer(role="root"), "bad-claims"),
        (bearer(exp=None), "bad-claims"),
        (bearer(user_id=None), "bad-claims"),
        ({"Authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJBSyJ9."}, "bad-token"),
        ({"Authorization": "Bearer " + jwt.encode({"sub": "A"}, "w" * 40)}, "bad-token"),
    ],
)
async def test_bad_bearer_tokens_are_401_json(
    url: str, client: httpx.AsyncClient, headers: dict[str, str], error: str
) -> None:
    assert_json_error(await client.get(f"{url}{EVENTS_PATH}", headers=headers), 401, error)


async def test_no_secret_or_token_is_logged(
    url: str, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = bearer()
    token = headers["Authorization"].split()[1]
    await client.post(
        f"{url}/server/login", json={"access_key": USER1.access_key, "secret_key": "wrong-one"}
    )
    assert (await login(client, url, USER1)).status_code == 200
    cookie = client.cookies["kep_session"]
    async with client.stream("GET", f"{url}{EVENTS_PATH}") as response:
        assert response.status_code == 200
    async with client.stream("GET", f"{url}{EVENTS_PATH}", headers=headers) as response:
        assert response.status_code == 200
    await client.get(f"{url}{EVENTS_PATH}", headers=bearer(role="root"))
    # The server's loggers (the test's own HTTP client logs its requests, cookies too).
    server = ("proxy", "hypercorn", "quart", "asyncio", "trio")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(server))
    assert "login" in text  # something was logged, and none of it is a secret
    for secret in (USER1.secret_key, "wrong-one", cookie, token, SESSION_KEY, JWT_KEY):
        assert secret not in text


# --- CORS -----------------------------------------------------------------------------


async def test_cors_headers_for_an_allowed_origin(url: str, client: httpx.AsyncClient) -> None:
    for response in (
        await client.get(f"{url}/", headers={"Origin": DASH}),
        await client.get(f"{url}{EVENTS_PATH}", headers={"Origin": DASH}),  # a 401
    ):
        assert response.headers["access-control-allow-origin"] == DASH
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "Origin" in response.headers.get_list("vary", split_commas=True)


async def test_cors_headers_on_an_admitted_stream(url: str, client: httpx.AsyncClient) -> None:
    # The stream's head is quart's answer (hooks included), sent after quart finished.
    target = f"{url}{EVENTS_PATH}"
    headers = signed_headers(target, USER1) | {"Origin": DASH}
    async with client.stream("GET", target, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["access-control-allow-origin"] == DASH
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "content-length" not in response.headers


async def test_cors_preflight_for_an_allowed_origin(url: str, client: httpx.AsyncClient) -> None:
    response = await client.options(
        f"{url}{EVENTS_PATH}",
        headers={
            "Origin": DASH,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == DASH
    assert response.headers["access-control-allow-credentials"] == "true"
    assert response.headers["access-control-allow-headers"] == "authorization, last-event-id"
    assert "GET" in response.headers["access-control-allow-methods"]
    vary = response.headers.get_list("vary", split_commas=True)
    assert {"Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"} <= set(
        vary
    )


async def test_no_cors_headers_for_other_origins(url: str, client: httpx.AsyncClient) -> None:
    evil = "https://evil.example"
    get = await client.get(f"{url}/", headers={"Origin": evil})
    preflight = await client.options(
        f"{url}{EVENTS_PATH}", headers={"Origin": evil, "Access-Control-Request-Method": "GET"}
    )
    assert get.status_code == 200
    assert_json_error(preflight, 403, "cors-refused")
    for response in (get, preflight):
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]


async def test_no_cors_headers_when_none_configured(proxy: Any, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{proxy.url}/", headers={"Origin": DASH})
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]


# --- GET / and the dashboard's files --------------------------------------------------


async def test_root_serves_the_page_only_to_browsers(url: str, client: httpx.AsyncClient) -> None:
    page = await client.get(f"{url}/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>" in page.text
    assert "/ui/app.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for accept in ("*/*", "application/json", None):
        headers = {"Accept": accept} if accept else {}
        response = await client.get(f"{url}/", headers=headers)
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {
            "version": "v4.20190615",
            "manager": "kernel-events-proxy",
            "proxy": response.json()["proxy"],
        }
        assert "Accept" in response.headers.get_list("vary", split_commas=True)


async def test_ui_files(url: str, client: httpx.AsyncClient) -> None:
    for path, content_type in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/index.html", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ]:
        response = await client.get(f"{url}{path}", headers={"Accept": "*/*"})
        assert response.status_code == 200, path
        assert response.headers["content-type"] == content_type
    for path in ("/ui/nope.js", "/ui/..%2Fapp.py", "/ui/../app.py"):
        response = await client.get(f"{url}{path}")
        assert response.status_code == 404, path


async def test_browser_responses_match_the_openapi_document(
    url: str, client: httpx.AsyncClient
) -> None:
    from .test_openapi import check

    login_url = f"{url}/server/login"
    check(await client.post(login_url, content=b"{", headers=JSON), "/server/login", "post")
    check(await client.post(login_url, content=b"{}", headers=TEXT), "/server/login", "post")
    check(await client.post(login_url, json={"access_key": "AK", "secret_key": "x"}),
          "/server/login", "post")  # fmt: skip
    check(await login(client, url, USER1, Origin="https://evil.example"), "/server/login", "post")
    check(await login(client, url, USER1), "/server/login", "post")
    check(await client.get(f"{url}/server/session"), "/server/session")
    check(await client.post(f"{url}/server/logout"), "/server/logout", "post")
    check(await client.get(f"{url}/server/session"), "/server/session")
    check(await client.get(f"{url}/ui/"), "/ui/")
    check(await client.get(f"{url}/ui/app.js"), "/ui/{name}")
    check(await client.get(f"{url}/ui/nope"), "/ui/{name}")


JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
