"""Hostile requests, byte for byte: hypothesis builds query strings, headers, cookies,
``Last-Event-ID`` values and login bodies, sends them over a raw socket to a real proxy
(no client library in between to normalise or refuse them), and every answer must be a
non-5xx; every refusal a 4xx with a JSON error body in the project's shape.

The requests are valid HTTP/1.1 framing (one Host, no Content-Length games): what the
HTTP layer itself refuses never reaches the app and is tested in ``test_limits.py``.
Signed requests are signed over the exact bytes sent, so the fuzzing reaches filters,
resume ids and the policy, not only the signature check.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import Settings
from proxy.signing import sign_headers

from ..conftest import make_settings
from ..helpers import ADMIN, EVENTS_PATH, SUPER, USER1, Key, lifecycle
from ..live import LiveProxy, RawResponse, live_proxy, raw_request

SCALE = float(os.environ.get("KEP_FUZZ_SCALE", "1"))
SESSION_KEY = "fuzz-session-signing-key-" + "s" * 20
ERROR_FIELDS = {"status", "error", "title", "detail"}
TALLY: Counter[str] = Counter()
F = TypeVar("F", bound=Callable[..., None])


def examples(n: int) -> Callable[[F], F]:
    return cast(
        Callable[[F], F],
        settings(
            max_examples=max(10, int(n * SCALE)),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def fuzz_settings(target: str) -> Settings:
    data = make_settings(target).model_dump(mode="python")
    data["session"] = {"secret_key": SESSION_KEY}
    data["limits"] = {
        "max_streams_per_key": 10_000,
        "login_attempts_per_address": 1_000_000,
        "login_failures_per_key": 1_000_000,
        "body_timeout": 2.0,
    }
    return Settings.model_validate(data)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveProxy]:
    with live_proxy(fuzz_settings) as proxy:
        proxy.upstream.log.append([lifecycle("kernel_started", "s1", USER1)])
        yield proxy


def request_bytes(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def signed(
    live: LiveProxy, key: Key, target: str, *, date: datetime | None = None
) -> list[tuple[str, str]]:
    headers = sign_headers(
        method="GET",
        raw_target=target,
        host=live.host,
        access_key=key.access_key,
        secret_key=key.secret_key,
        date=date or datetime.now(UTC),
    )
    return list(headers.items())


def check(response: RawResponse, *allowed: int, head: bool = False) -> None:
    """The invariant: no 5xx; a refusal is JSON naming the problem; nothing unexpected."""
    TALLY[str(response.status)] += 1
    assert response.status < 500, (response.status, response.body[:300])
    if allowed:
        assert response.status in allowed, (response.status, response.body[:300])
    if response.status >= 400:
        assert response.header("content-type") == "application/json", response.headers
        if head:  # HEAD: the same head, no body
            return
        body = response.json()
        assert set(body) == ERROR_FIELDS, body
        assert body["status"] == response.status
        for field in ("error", "detail"):
            assert isinstance(body[field], str), body
            assert body[field], body


# --- Strategies ---------------------------------------------------------------------------

# Characters a request target may hold as sent (h11: visible ASCII), with '#' left out
# (a fragment is never sent) and percent-escapes of any byte for everything else.
_TARGET_CHARS = st.sampled_from(
    [chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#%"]
    + ["&", "=", ";", "*", "+", "%20", "%00", "%0A", "%0D", "%FF", "%C3%A9", "%E2%80%A8", "%"]
)
_PARAM_NAMES = st.sampled_from(
    [
        "sessionId",
        "ownerAccessKey",
        "owner_access_key",
        "group",
        "groupName",
        "lastEventId",
        "SESSIONID",
        "session_id",
        "",
        "a",
    ]
)
_RAW = st.lists(_TARGET_CHARS, max_size=40).map("".join)
_VALUE = st.one_of(
    _RAW,
    st.sampled_from(["*", "s1", "AKUSER1", "AKUSER2", "g1", "x" * 300, "log:1", "%2A"]),
)
_QUERY = st.one_of(
    _RAW,
    st.lists(
        st.tuples(_PARAM_NAMES, st.sampled_from(["=", "", "=="]), _VALUE).map("".join),
        max_size=20,
    ).map("&".join),
)

# A header value h11 accepts: visible ASCII and obs-text, spaces inside.
_VALUE_CHARS = st.sampled_from(
    [chr(c) for c in range(0x21, 0x7F)] + [" ", "\t", "\x80", "\xe9", "\xff", "\xa0"]
)
_HEADER_VALUE = st.lists(_VALUE_CHARS, min_size=1, max_size=80).map(
    lambda cs: "".join(cs).strip(" \t") or "x"
)
_TOKEN = st.from_regex(r"[A-Za-z0-9!#$&'*+.^_`|~-]{1,30}", fullmatch=True)
# Framing headers are not fuzzed here: h11 owns them, and refuses bad ones itself.
_FRAMING = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect"}
_INTERESTING = st.sampled_from(
    [
        "Authorization",
        "Date",
        "X-BackendAI-Date",
        "X-BackendAI-Version",
        "Content-Type",
        "Accept",
        "Origin",
        "Cookie",
        "Last-Event-ID",
        "X-Forwarded-For",
        "Access-Control-Request-Method",
        "Access-Control-Request-Headers",
    ]
)
_HEADER_NAME = st.one_of(_INTERESTING, _TOKEN).filter(lambda n: n.lower() not in _FRAMING)
_AUTH_VALUES = st.one_of(
    _HEADER_VALUE,
    st.builds(
        lambda key, sig, sep: f"BackendAI signMethod=HMAC-SHA256,{sep}credential={key}:{sig}",
        st.sampled_from(["AKUSER1", "AKSUPER", "AKNOBODY", "", "x" * 200]),
        st.from_regex(r"[0-9a-fA-F]{0,70}", fullmatch=True),
        st.sampled_from(["", " ", "  "]),
    ),
    st.builds(lambda t: f"Bearer {t}", _HEADER_VALUE),
)
_DATES = st.one_of(
    _HEADER_VALUE,
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(["Mon, 01 Jan 0001 00:00:00 +2359", "9999-12-31T23:59:59-23:59", "0"]),
)
_PATHS = st.sampled_from(
    [EVENTS_PATH, "/", "/server/session", "/ui/", "/ui/app.js", "/healthz", "/nope", "/ui/.."]
)


# --- Query strings ------------------------------------------------------------------------


@examples(600)
@given(query=_QUERY, key=st.sampled_from([USER1, ADMIN, SUPER, None]))
def test_any_query_string_is_answered_in_json(live: LiveProxy, query: str, key: Key | None) -> None:
    target = f"{EVENTS_PATH}?{query}"
    headers = [("Host", live.host)] + (signed(live, key, target) if key else [])
    response = raw_request(live.url, request_bytes("GET", target, headers))
    check(response, 200, 400, 401, 403, 414)
    if key is None:
        assert response.status in (401, 414)


# --- Headers ------------------------------------------------------------------------------


@examples(600)
@given(
    path=_PATHS,
    extra=st.lists(
        st.one_of(
            st.tuples(_HEADER_NAME, _HEADER_VALUE),
            st.tuples(st.just("Authorization"), _AUTH_VALUES),
            st.tuples(st.sampled_from(["Date", "X-BackendAI-Date"]), _DATES),
        ),
        max_size=8,
    ),
    host=st.one_of(st.none(), _HEADER_VALUE),
    sign_as=st.sampled_from([None, USER1, SUPER]),
    method=st.sampled_from(["GET", "GET", "HEAD", "OPTIONS", "DELETE", "PUT"]),
)
def test_any_headers_are_answered_in_json(
    live: LiveProxy,
    path: str,
    extra: list[tuple[str, str]],
    host: str | None,
    sign_as: Key | None,
    method: str,
) -> None:
    headers = [("Host", host or live.host)]
    if sign_as is not None:
        headers += signed(live, sign_as, path)
    headers += extra
    response = raw_request(live.url, request_bytes(method, path, headers))
    check(response, head=method == "HEAD")


# --- Cookies ------------------------------------------------------------------------------

_COOKIE_VALUE = st.one_of(
    _HEADER_VALUE.filter(lambda v: ";" not in v),
    st.sampled_from([".eJyrVkrMVrJScvR2", "a.b.c", ".", "..", '"quoted"']),
)


@examples(300)
@given(
    path=st.sampled_from([EVENTS_PATH, "/server/session", "/server/logout"]),
    cookies=st.lists(
        st.tuples(st.sampled_from(["kep_session", "other", "kep_session "]), _COOKIE_VALUE),
        min_size=1,
        max_size=4,
    ),
)
def test_any_cookie_is_answered_in_json(
    live: LiveProxy, path: str, cookies: list[tuple[str, str]]
) -> None:
    cookie = "; ".join(f"{k}={v}" for k, v in cookies)
    method = "POST" if path == "/server/logout" else "GET"
    headers = [("Host", live.host), ("Cookie", cookie)]
    response = raw_request(live.url, request_bytes(method, path, headers))
    check(response, 200, 400, 401)
    if path != "/server/logout":
        assert response.status in (400, 401)  # no forged cookie ever signs anyone in


# --- Last-Event-ID ------------------------------------------------------------------------

_EVENT_IDS = st.one_of(
    _HEADER_VALUE,
    st.builds(
        lambda log, seq: f"{log}:{seq}",
        st.from_regex(r"[0-9A-Za-z_-]{0,70}", fullmatch=True),
        st.one_of(st.integers(0, 2**70), st.just(-1)),
    ),
)


@examples(400)
@given(
    value=_EVENT_IDS,
    how=st.sampled_from(["header", "query", "both", "twice"]),
    key=st.sampled_from([USER1, SUPER]),
)
def test_any_last_event_id_is_answered_in_json(
    live: LiveProxy, value: str, how: str, key: Key
) -> None:
    from urllib.parse import quote

    target = EVENTS_PATH + (f"?lastEventId={quote(value, safe='')}" if how != "header" else "")
    headers = [("Host", live.host), *signed(live, key, target)]
    if how in ("header", "both", "twice"):
        headers.append(("Last-Event-ID", value))
    if how == "twice":
        headers.append(("Last-Event-ID", value))
    response = raw_request(live.url, request_bytes("GET", target, headers))
    check(response, 200, 400, 414)


# --- Login bodies -------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner),
    max_leaves=20,
)
_LOGIN_OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        "access_key": st.one_of(st.sampled_from(["AKUSER1", "AKADMIN", "AKNOBODY"]), _JSON),
        "secret_key": st.one_of(st.sampled_from([USER1.secret_key, "wrong-secret"]), _JSON),
        "extra": _JSON,
    },
)
_BODIES = st.one_of(
    _LOGIN_OBJECTS.map(lambda d: json.dumps(d).encode()),
    _JSON.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=300),
    st.integers(1, 6000).map(lambda n: b"[" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n),
    st.just(b'{"access_key": "AKUSER1", "secret_key": "' + b"x" * 5000 + b'"}'),
    st.just(b'{"access_key": "\xff\xfe", "secret_key": "x"}'),
    st.just(b'{"access_key": 1e999, "secret_key": "x"}'),
    st.just(b'{"access_key": "a", "access_key": "b", "secret_key": "x"}'),
)
_CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        None,
    ]
)


@examples(600)
@given(
    body=_BODIES,
    content_type=_CONTENT_TYPES,
    origin=st.one_of(
        st.none(),
        st.sampled_from(["http://[", "http://evil.example", "null", "http://%", "://"]),
        _HEADER_VALUE,
    ),
)
def test_any_login_body_is_answered_in_json(
    live: LiveProxy, body: bytes, content_type: str | None, origin: str | None
) -> None:
    headers = [("Host", live.host)]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    if origin is not None:
        headers.append(("Origin", origin))
    response = raw_request(live.url, request_bytes("POST", "/server/login", headers, body))
    check(response, 200, 400, 401, 403, 415)


# --- Regressions found by the fuzzing above (each was a 500) ---------------------------


def test_deeply_nested_login_json_is_400_not_500(live: LiveProxy) -> None:
    headers = [("Host", live.host), ("Content-Type", "application/json")]
    response = raw_request(live.url, request_bytes("POST", "/server/login", headers, b"[" * 3000))
    check(response, 400)
    assert response.json()["error"] == "bad-json"


def test_unparseable_origin_is_403_not_500(live: LiveProxy) -> None:
    headers = [("Host", live.host), ("Content-Type", "application/json"), ("Origin", "http://[")]
    response = raw_request(live.url, request_bytes("POST", "/server/login", headers, b"{}"))
    check(response, 403)
    assert response.json()["error"] == "bad-origin"


@pytest.mark.parametrize("host", ["a..b", "x" * 64, ".example", "x" * 64 + ".example:8080"])
@pytest.mark.parametrize("path", ["/healthz", EVENTS_PATH, "/server/login", "/nope"])
def test_a_host_that_is_no_valid_host_name_is_400_not_500(
    live: LiveProxy, host: str, path: str
) -> None:
    """Regression: werkzeug raised BadHost while Quart built the request context,
    outside every error handler; hypercorn answered 500 with an empty body."""
    response = raw_request(live.url, request_bytes("GET", path, [("Host", host)]))
    check(response, 400)
    assert response.json()["error"] == "bad-host"


def test_a_date_far_outside_any_window_is_401_not_500(live: LiveProxy) -> None:
    for date in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"):
        headers = [("Host", live.host), *signed(live, SUPER, EVENTS_PATH)]
        headers = [(k, date if k == "Date" else v) for k, v in headers]
        check(raw_request(live.url, request_bytes("GET", EVENTS_PATH, headers)), 401)
    stale = datetime.now(UTC) - timedelta(days=3650)
    headers = [("Host", live.host), *signed(live, SUPER, EVENTS_PATH, date=stale)]
    check(raw_request(live.url, request_bytes("GET", EVENTS_PATH, headers)), 401)


def test_zz_http_fuzzing_summary() -> None:
    print(f"\nraw HTTP fuzzing: {dict(TALLY)}")
