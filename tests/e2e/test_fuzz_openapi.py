"""Schema-driven fuzzing: schemathesis generates requests for every operation of the
OpenAPI document (positive and negative data), sends them to a real proxy on a
loopback socket, and every answer must be documented, never a 5xx, and every refusal
a JSON error in the project's shape.

Requests go out signed by a real keypair, with a session cookie, with a bearer JWT, or
as generated (mostly unauthenticated or carrying garbage credentials), so the fuzzing
reaches past authentication into filters, resume ids and the login body. An event
stream that is accepted (200) is checked for its head and closed: it never ends.

``KEP_FUZZ_SCALE`` multiplies the examples (default 1: a few thousand requests in all,
under a minute).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.config import Settings
from proxy.generations import STREAM_PATHS
from proxy.openapi import DOCUMENT
from proxy.signing import sign_headers

from ..conftest import make_settings
from ..helpers import ADMIN, SUPER, USER1, Key, lifecycle
from ..live import LiveProxy, live_proxy

SCALE = float(os.environ.get("KEP_FUZZ_SCALE", "1"))
# Examples per operation and mode; the two with the most to get wrong get more.
EXAMPLES = max(10, int(100 * SCALE))
DEEP = {"GET /stream/kernel/_/events": 8, "GET /events/session": 8, "POST /server/login": 5}
SESSION_KEY = "fuzz-session-signing-key-" + "s" * 20
JWT_KEY = "fuzz-jwt-hmac-key-" + "j" * 30
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
OPERATIONS = sorted(op.ok().label for op in SCHEMA.get_all_operations() if isinstance(op, Ok))
# Negative data needs something to negate: parameters or a body.
NEGATABLE = {
    f"{method.upper()} {path}"
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
    if operation.get("parameters") or operation.get("requestBody")
}
CASES = [
    (mode, label)
    for label in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or label in NEGATABLE
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
ERROR_FIELDS = {"status", "error", "title", "detail"}
# What the requests in this module got, for the summary test at the end.
TALLY: Counter[str] = Counter()


def fuzz_settings(target: str) -> Settings:
    data = make_settings(target, heartbeat_interval=0.2).model_dump(mode="python")
    data["session"] = {"secret_key": SESSION_KEY}
    data["jwt"] = {"key": JWT_KEY}
    # Generous caps: the fuzzing should reach the handlers, not the limits (those have
    # tests of their own), though a 429 would still have to be a documented answer.
    data["limits"] = {
        "max_streams_per_key": 10_000,
        "login_attempts_per_address": 1_000_000,
        "login_failures_per_key": 1_000_000,
    }
    return Settings.model_validate(data)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveProxy]:
    with live_proxy(fuzz_settings) as proxy:
        proxy.upstream.log.append(
            [lifecycle("kernel_started", f"s{i}", key) for i, key in enumerate((USER1, ADMIN))]
        )
        yield proxy


@pytest.fixture(scope="module")
def session_cookie(live: LiveProxy) -> str:
    response = requests.post(
        f"{live.url}/server/login",
        json={"access_key": ADMIN.access_key, "secret_key": ADMIN.secret_key},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    cookie = response.cookies.get("kep_session")
    assert cookie is not None
    return cookie


class Signed(requests.auth.AuthBase):
    """Signs the request exactly as sent (path and raw query), as the SDK does."""

    def __init__(self, key: Key, host: str) -> None:
        self.key, self.host = key, host

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        content_type = str(r.headers.get("Content-Type", "application/octet-stream"))
        r.headers["Host"] = self.host
        r.headers.update(
            sign_headers(
                method=r.method or "GET",
                raw_target=r.path_url,
                host=self.host,
                access_key=self.key.access_key,
                secret_key=self.key.secret_key,
                date=datetime.now(UTC),
                content_type=content_type,
            )
        )
        return r


def bearer(key: Key) -> str:
    claims = {
        "sub": key.access_key,
        "role": key.role,
        "user_id": key.user_id,
        "domain": key.domain,
        "exp": datetime.now(UTC) + timedelta(hours=1),
    }
    return jwt.encode(claims, JWT_KEY, algorithm="HS256")


CREDENTIALS = st.sampled_from(
    ["as-generated", "signed-user", "signed-admin", "signed-super", "cookie", "bearer"]
)


def exchange(live: LiveProxy, cookie: str, case: Any, credentials: str) -> None:
    kwargs = case.as_transport_kwargs(base_url=live.url)
    if credentials.startswith("signed-"):
        key = {"user": USER1, "admin": ADMIN, "super": SUPER}[credentials[7:]]
        kwargs["auth"] = Signed(key, live.host)
        kwargs["headers"] = {
            k: v for k, v in kwargs["headers"].items() if k.lower() != "authorization"
        }
    elif credentials == "cookie":
        kwargs["cookies"] = {**(kwargs.get("cookies") or {}), "kep_session": cookie}
        kwargs["headers"] = {
            k: v for k, v in kwargs["headers"].items() if k.lower() != "authorization"
        }
    elif credentials == "bearer":
        kwargs["headers"] = {**kwargs["headers"], "Authorization": f"Bearer {bearer(SUPER)}"}
    try:
        response = requests.request(**kwargs, stream=True, timeout=10, allow_redirects=False)
    except (requests.exceptions.InvalidHeader, UnicodeEncodeError, ValueError):
        # A value no HTTP client can send (the client refuses it, nothing was sent).
        # requests' connection errors are not among these: those fail the test.
        TALLY["unsendable"] += 1
        return
    with response:
        status = response.status_code
        TALLY[f"{status}"] += 1
        assert status < 500, f"{case.method} {response.url} -> {status}: {response.text[:500]}"
        media = response.headers.get("Content-Type", "")
        if status == 200 and media.startswith("text/event-stream"):
            # An endless stream: its head is the answer (the document says 200 + SSE).
            assert case.operation.path in STREAM_PATHS
            assert media == "text/event-stream; charset=utf-8"
            return
        response.content  # noqa: B018 - read it whole before validating
        if status >= 400:
            assert media == "application/json", (status, media, response.text[:200])
            body = response.json()
            assert set(body) == ERROR_FIELDS, body
            assert body["status"] == status
            assert body["error"], body
            assert body["detail"], body
        case.validate_response(response, checks=CHECKS)


@pytest.mark.parametrize(("mode", "operation"), CASES)
def test_every_operation_answers_as_documented_never_5xx(
    live: LiveProxy, session_cookie: str, mode: GenerationMode, operation: str
) -> None:
    op = SCHEMA.find_operation_by_label(operation)
    assert op is not None
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES * DEEP.get(operation, 1),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode), credentials=CREDENTIALS)
    def run(case: Any, credentials: str) -> None:
        TALLY["cases"] += 1
        exchange(live, session_cookie, case, credentials)

    run()
    TALLY["milliseconds"] += int((time.monotonic() - started) * 1000)


def test_zz_fuzzing_summary(live: LiveProxy) -> None:
    """Runs last in this module: the fuzzing above really sent requests."""
    print(f"\nschemathesis: {dict(TALLY)}")
    if TALLY["cases"]:
        assert sum(v for k, v in TALLY.items() if k.isdigit()) > 0
        assert not any(k.isdigit() and int(k) >= 500 for k in TALLY)
