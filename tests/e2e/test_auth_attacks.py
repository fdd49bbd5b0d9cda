"""Attacks on authentication, over a real socket: every one is a 401 in JSON.

Request signatures: another key's, another host's, an altered path or query, a date
outside the clock-skew window, yesterday's date key under today's Date, truncated or
oversized headers. Session cookies: tampered, expired, signed with another key, of a
changed keypair. Bearer tokens: ``alg: none``, another key, expired.
(Unit-level variants: ``tests/test_signing.py``, ``tests/test_sessions.py``.)
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import jwt
import pytest
import trio

from proxy.config import Settings
from proxy.server import RunningProxy, run_proxy
from proxy.sessions import SessionCodec
from proxy.signing import Keypair, sign_headers, signature, string_to_sign
from proxy.upstream_server import UpstreamServer

from ..conftest import make_settings
from ..helpers import EVENTS_PATH, SUPER, USER1, wait_until
from ..live import RawResponse, raw_request

SESSION_KEY = "attack-session-signing-key-" + "s" * 20
JWT_KEY = "attack-jwt-hmac-key-" + "j" * 30
VERSION = "v4.20190615"


@pytest.fixture
async def url(upstream: UpstreamServer, nursery: trio.Nursery) -> AsyncIterator[str]:
    data = make_settings(upstream.target).model_dump(mode="python")
    data["session"] = {"secret_key": SESSION_KEY, "max_age": 600}
    data["jwt"] = {"key": JWT_KEY}
    running: RunningProxy = await nursery.start(run_proxy, Settings.model_validate(data))
    await wait_until(lambda: running.bridge.live)
    yield running.url
    running.shutdown()


def host_of(url: str) -> str:
    return url.split("//", 1)[1]


def send(url: str, target: str, headers: dict[str, str], host: str | None = None) -> RawResponse:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host or host_of(url)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return raw_request(url, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def assert_401(response: RawResponse, error: str) -> None:
    assert response.status == 401, (response.status, response.body)
    assert response.header("content-type") == "application/json"
    assert response.header("www-authenticate") == "BackendAI"
    body = response.json()
    assert set(body) == {"status", "error", "title", "detail"}
    assert (body["status"], body["error"]) == (401, error), body


def signed(
    url: str,
    target: str = EVENTS_PATH,
    *,
    host: str | None = None,
    access_key: str = SUPER.access_key,
    secret: str = SUPER.secret_key,
    date: datetime | None = None,
) -> dict[str, str]:
    return sign_headers(
        method="GET",
        raw_target=target,
        host=host or host_of(url),
        access_key=access_key,
        secret_key=secret,
        date=date or datetime.now(UTC),
    )


async def in_thread(fn: Callable[[], RawResponse]) -> RawResponse:
    return await trio.to_thread.run_sync(fn)


# --- Request signatures -----------------------------------------------------------------


async def test_a_correctly_signed_raw_request_is_accepted(url: str) -> None:
    # The baseline every attack below is a variation of.
    response = await in_thread(lambda: send(url, EVENTS_PATH, signed(url)))
    assert response.status == 200


async def test_signed_with_another_keys_secret_is_401(url: str) -> None:
    headers = signed(url, secret=USER1.secret_key)  # AKSUPER's name, AKUSER1's secret
    assert_401(await in_thread(lambda: send(url, EVENTS_PATH, headers)), "bad-signature")


async def test_signed_for_another_host_is_401(url: str) -> None:
    # Signed for evil.example (a phishing proxy, say), replayed to this host...
    headers = signed(url, host="evil.example")
    assert_401(await in_thread(lambda: send(url, EVENTS_PATH, headers)), "bad-signature")
    # ...or sent here with the Host header it was signed for changed on the way.
    headers = signed(url)
    response = await in_thread(lambda: send(url, EVENTS_PATH, headers, host="other.example"))
    assert_401(response, "bad-signature")


@pytest.mark.parametrize(
    ("signed_for", "sent"),
    [
        (f"{EVENTS_PATH}?sessionId=mine", f"{EVENTS_PATH}?sessionId=*"),  # altered query
        (f"{EVENTS_PATH}?group=g1", f"{EVENTS_PATH}?group=g1&group=g2"),  # appended
        (f"{EVENTS_PATH}?group=g1", EVENTS_PATH),  # stripped
        ("/stream/kernel/_/event", EVENTS_PATH),  # altered path
        (EVENTS_PATH, EVENTS_PATH.upper().replace("/STREAM", "/stream")),
        (f"{EVENTS_PATH}?sessionId=%2A", f"{EVENTS_PATH}?sessionId=*"),  # re-encoded
    ],
)
async def test_an_altered_target_is_401(url: str, signed_for: str, sent: str) -> None:
    headers = signed(url, signed_for)
    response = await in_thread(lambda: send(url, sent, headers))
    if response.status == 404:  # a path with no route never reaches authentication
        return
    assert_401(response, "bad-signature")


@pytest.mark.parametrize("minutes", [16, -16, 60 * 24])
async def test_a_replay_outside_the_clock_skew_window_is_401(url: str, minutes: int) -> None:
    headers = signed(url, date=datetime.now(UTC) - timedelta(minutes=minutes))
    assert_401(await in_thread(lambda: send(url, EVENTS_PATH, headers)), "stale-date")


async def test_yesterdays_date_key_under_todays_date_is_401(url: str) -> None:
    """The signing key is derived from the date: one day's key cannot sign another's."""
    now = datetime.now(UTC)
    raw_date = now.isoformat()
    host = host_of(url)
    to_sign = string_to_sign(
        "GET", EVENTS_PATH, raw_date, host, "application/octet-stream", VERSION
    )
    for key_day in (now - timedelta(days=1), now + timedelta(days=1)):
        sig = signature(SUPER.secret_key, key_day, host, to_sign)
        headers = {
            "Date": raw_date,
            "X-BackendAI-Version": VERSION,
            "Authorization": f"BackendAI signMethod=HMAC-SHA256, credential=AKSUPER:{sig}",
        }
        assert_401(await in_thread(partial(send, url, EVENTS_PATH, headers)), "bad-signature")
    # The same construction with today's key is accepted (the test is not vacuous).
    good = signature(SUPER.secret_key, now, host, to_sign)
    headers = {
        "Date": raw_date,
        "X-BackendAI-Version": VERSION,
        "Authorization": f"BackendAI signMethod=HMAC-SHA256, credential=AKSUPER:{good}",
    }
    assert (await in_thread(lambda: send(url, EVENTS_PATH, headers))).status == 200


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda a: a[:-1], "malformed"),  # 63 hex digits
        (lambda a: a[: len(a) // 2], "malformed"),  # cut in the middle
        (lambda a: a + "0", "malformed"),  # 65
        (lambda a: a + "," + "x" * 1100, "malformed"),  # oversized (trailing spaces would
        # be stripped by the HTTP layer: that is the same header)
        (lambda a: a.replace("credential=AKSUPER", "credential=" + "A" * 129), "malformed"),
        (lambda a: a.replace("HMAC-SHA256", "HMAC-SHA1"), "malformed"),
        (lambda a: a.replace("BackendAI ", ""), "malformed"),
        (lambda a: "", "malformed"),
    ],
)
async def test_a_truncated_or_oversized_authorization_is_401(
    url: str, mangle: Callable[[str], str], error: str
) -> None:
    headers = signed(url)
    headers["Authorization"] = mangle(headers["Authorization"])
    assert_401(await in_thread(lambda: send(url, EVENTS_PATH, headers)), error)


@pytest.mark.parametrize(
    ("date", "error"),
    [
        ("", "bad-date"),
        ("x" * 65, "bad-date"),  # oversized
        ("2024-13-45T00:00:00", "bad-date"),
        ("9999-12-31T23:59:59-23:59", "stale-date"),
    ],
)
async def test_a_bad_or_oversized_date_is_401(url: str, date: str, error: str) -> None:
    headers = signed(url) | {"Date": date}
    if not date:
        del headers["Date"]
    assert_401(await in_thread(lambda: send(url, EVENTS_PATH, headers)), error)


# --- Session cookies ------------------------------------------------------------------------


def cookie_for(key: Any, *, signing_key: str = SESSION_KEY, at: float | None = None) -> str:
    codec = SessionCodec(signing_key, 600, clock=lambda: at if at is not None else time.time())
    return codec.issue(Keypair(key.access_key, key.secret_key, _principal(key)))


def _principal(key: Any) -> Any:
    from proxy.policy import Principal, Role

    return Principal(key.access_key, Role(key.role), key.user_id, key.domain)


def _flip(token: str, index: int) -> str:
    c = token[index]
    return token[:index] + ("A" if c != "A" else "B") + token[index + 1 :]


def _forged_payload(token: str) -> str:
    """The payload part swapped for a superadmin's, the signature kept."""
    payload = json.dumps(
        {"ak": "AKUSER1", "role": "superadmin", "uid": "u1", "dom": "default", "kf": "x"}
    ).encode()
    encoded = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    _, timestamp, sig = token.rsplit(".", 2)
    return f"{encoded}.{timestamp}.{sig}"


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: _flip(cookie_for(USER1), -5), "bad-session"),  # signature tampered
        (lambda: _flip(cookie_for(USER1), 3), "bad-session"),  # payload tampered
        (lambda: _forged_payload(cookie_for(USER1)), "bad-session"),  # privilege escalation
        (lambda: cookie_for(USER1, at=time.time() - 3600), "session-expired"),
        (lambda: cookie_for(USER1, signing_key="another-key-" + "k" * 30), "bad-session"),
        (lambda: cookie_for(USER1).rsplit(".", 1)[0], "bad-session"),  # signature dropped
        (lambda: "x" * 5000, "bad-session"),  # oversized
        (lambda: cookie_for(_Ghost()), "session-revoked"),  # validly signed, unknown key
    ],
)
async def test_bad_session_cookies_are_401(url: str, make: Callable[[], str], error: str) -> None:
    value = make()
    for path in (EVENTS_PATH, "/server/session"):
        response = await in_thread(partial(send, url, path, {"Cookie": f"kep_session={value}"}))
        assert_401(response, error)
    # The genuine article works (the tests above are not vacuous).
    good = cookie_for(USER1)
    response = await in_thread(
        lambda: send(url, "/server/session", {"Cookie": f"kep_session={good}"})
    )
    assert response.status == 200


class _Ghost:
    access_key, secret_key, role, user_id, domain = "AKGHOST", "s" * 20, "superadmin", "g", "d"


# --- Bearer tokens -----------------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


CLAIMS = {"sub": "AKIDP", "role": "superadmin", "user_id": "i", "domain": "default"}


@pytest.mark.parametrize(
    ("token", "error"),
    [
        (f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(CLAIMS | {'exp': 2**40})}.", "bad-token"),
        (f"{_b64({'alg': 'None'})}.{_b64(CLAIMS | {'exp': 2**40})}.", "bad-token"),
        (
            jwt.encode(CLAIMS | {"exp": 2**40}, "another-" + "k" * 40, algorithm="HS256"),
            "bad-token",
        ),
        (jwt.encode(CLAIMS | {"exp": 1}, JWT_KEY, algorithm="HS256"), "token-expired"),
        (jwt.encode(CLAIMS | {"exp": 2**40}, JWT_KEY + "x" * 40, algorithm="HS512"), "bad-token"),
    ],
)
async def test_bad_bearer_tokens_are_401(url: str, token: str, error: str) -> None:
    response = await in_thread(lambda: send(url, EVENTS_PATH, {"Authorization": f"Bearer {token}"}))
    assert_401(response, error)


async def test_auth_failures_are_counted_by_reason(url: str) -> None:
    await in_thread(lambda: send(url, EVENTS_PATH, {}))
    await in_thread(lambda: send(url, EVENTS_PATH, signed(url, secret="wrong-secret-xxxxx")))
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"{url}/metrics")).text
    assert 'kep_auth_failures_total{reason="missing"} 1.0' in metrics
    assert 'kep_auth_failures_total{reason="bad-signature"} 1.0' in metrics
