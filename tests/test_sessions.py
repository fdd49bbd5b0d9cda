"""Login, session cookies and bearer JWTs, without I/O (proxy/sessions.py)."""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from proxy import sessions
from proxy.policy import Principal, Role
from proxy.sessions import (
    MAX_LOGIN_BODY,
    MAX_TOKEN_LENGTH,
    JwtVerifier,
    LoginRequestError,
    SessionCodec,
    authenticate_browser,
    bearer_token,
    check_credentials,
    parse_login,
    principal_from_claims,
)
from proxy.signing import AuthError, Keypair

SESSION_KEY = "k" * 40
JWT_KEY = "j" * 64
ALICE = Keypair("AKALICE", "alice-secret-1234", Principal("AKALICE", Role.USER, "u-alice", "dom"))
ROOT = Keypair("AKROOT", "root-secret-12345", Principal("AKROOT", Role.SUPERADMIN, "u-root", "dom"))
KEYS = {k.access_key: k for k in (ALICE, ROOT)}


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(AuthError) as info:
        call()
    return info.value.reason


# --- parse_login ----------------------------------------------------------------------


def login_error(body: bytes, content_type: str | None = "application/json") -> LoginRequestError:
    with pytest.raises(LoginRequestError) as info:
        parse_login(body, content_type)
    return info.value


def test_login_body_parses() -> None:
    got = parse_login(
        b'{"access_key": "AK1", "secret_key": "s"}', "application/json; charset=utf-8"
    )
    assert (got.access_key, got.secret_key) == ("AK1", "s")
    assert "'s'" not in repr(got)
    assert "***" in repr(got)


@pytest.mark.parametrize(
    ("body", "error", "names"),
    [
        (b"not json", "bad-json", "JSON"),
        (b"\xff\xfe", "bad-json", "JSON"),
        (b"[1, 2]", "bad-body", "object"),
        (b'"AK1"', "bad-body", "object"),
        (b'{"access_key": "AK1"}', "missing-field", "secret_key"),
        (b'{"secret_key": "s"}', "missing-field", "access_key"),
        (b'{"access_key": 1, "secret_key": "s"}', "bad-field", "access_key"),
        (b'{"access_key": "AK1", "secret_key": null}', "bad-field", "secret_key"),
        (b'{"access_key": "AK1", "secret_key": ["s"]}', "bad-field", "secret_key"),
        (b'{"access_key": "", "secret_key": "s"}', "bad-field", "access_key"),
        (
            b'{"access_key": "AK1", "secret_key": "s", "remember": true}',
            "unknown-field",
            "remember",
        ),
    ],
)
def test_malformed_login_bodies_are_400_naming_the_problem(
    body: bytes, error: str, names: str
) -> None:
    exc = login_error(body)
    assert (exc.status, exc.error) == (400, error)
    assert names in exc.detail


def test_oversized_login_body_is_400() -> None:
    body = json.dumps({"access_key": "AK1", "secret_key": "x" * MAX_LOGIN_BODY}).encode()
    exc = login_error(body)
    assert (exc.status, exc.error) == (400, "body-too-large")


def test_overlong_field_is_400() -> None:
    exc = login_error(json.dumps({"access_key": "A" * 300, "secret_key": "s"}).encode())
    assert (exc.status, exc.error) == (400, "bad-field")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_login_needs_json_content_type(content_type: str | None) -> None:
    # A cross-site form can send text/plain that looks like JSON; it must not log in.
    exc = login_error(b'{"access_key": "AK1", "secret_key": "s"}', content_type)
    assert (exc.status, exc.error) == (415, "unsupported-media-type")


# --- check_credentials ----------------------------------------------------------------


def test_right_credentials_give_the_keypair() -> None:
    assert check_credentials("AKALICE", ALICE.secret_key, KEYS.get) is ALICE


@pytest.mark.parametrize(
    ("access_key", "secret"), [("AKALICE", "wrong"), ("AKNOBODY", "alice-secret-1234"), ("", "")]
)
def test_wrong_credentials_give_one_answer(access_key: str, secret: str) -> None:
    with pytest.raises(AuthError) as info:
        check_credentials(access_key, secret, KEYS.get)
    assert (info.value.reason, info.value.message) == (
        "bad-credentials",
        "access key or secret key is wrong",
    )


def test_unknown_key_and_wrong_secret_do_the_same_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not timed: every step both paths take is recorded and must be the same."""
    trace: list[tuple[str, Any]] = []
    real_digest, real_compare = sessions._digest, hmac.compare_digest

    def digest(secret: str) -> bytes:
        out = real_digest(secret)
        trace.append(("digest", len(out)))
        return out

    def compare(a: bytes, b: bytes) -> bool:
        trace.append(("compare", (type(a), len(a), type(b), len(b))))
        return real_compare(a, b)

    def lookup(key: str) -> Keypair | None:
        trace.append(("lookup", None))
        return KEYS.get(key)

    monkeypatch.setattr(sessions, "_digest", digest)
    monkeypatch.setattr(hmac, "compare_digest", compare)
    traces = []
    for access_key, secret in [
        ("AKALICE", "a-wrong-secret"),  # known key, wrong secret
        ("AKNOBODY", "a-wrong-secret"),  # unknown key
        ("AKNOBODY", "x" * 200),  # unknown key, long secret
        ("AKALICE", ALICE.secret_key),  # success: the same work too
    ]:
        trace.clear()
        with contextlib.suppress(AuthError):
            check_credentials(access_key, secret, lookup)
        traces.append(list(trace))
    assert traces[0] == [
        ("lookup", None),
        ("digest", 32),
        ("digest", 32),
        ("compare", (bytes, 32, bytes, 32)),
    ]
    assert all(t == traces[0] for t in traces)


# --- Session cookies ------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def codec(clock: Clock | None = None, key: str = SESSION_KEY, max_age: int = 3600) -> SessionCodec:
    return SessionCodec(key, max_age, clock=clock or Clock())


def test_cookie_round_trip_gives_the_principal() -> None:
    c = codec()
    assert c.verify(c.issue(ALICE), KEYS.get) == ALICE.principal


def test_cookie_carries_no_secret() -> None:
    c = codec()
    token = c.issue(ALICE)
    payload = c._serializer.loads(token)
    assert payload["ak"] == "AKALICE"
    assert set(payload) == {"ak", "role", "uid", "dom", "kf"}
    assert ALICE.secret_key not in token
    assert ALICE.secret_key not in json.dumps(payload)
    assert SESSION_KEY not in token


def test_cookie_is_accepted_by_another_process_with_the_same_key() -> None:
    # A restart or another replica: a new codec, the same configured key.
    assert codec().verify(codec().issue(ROOT), KEYS.get) == ROOT.principal


def test_cookie_signed_with_another_key_is_refused() -> None:
    token = codec(key="o" * 40).issue(ALICE)
    assert reason_of(lambda: codec().verify(token, KEYS.get)) == "bad-session"


def test_cookie_expires_after_max_age() -> None:
    clock = Clock()
    c = codec(clock, max_age=600)
    token = c.issue(ALICE)
    clock.now += 600
    assert c.verify(token, KEYS.get) == ALICE.principal
    clock.now += 1
    assert reason_of(lambda: c.verify(token, KEYS.get)) == "session-expired"


def test_cookie_from_the_future_is_refused() -> None:
    clock = Clock()
    token = codec(clock).issue(ALICE)
    clock.now -= 120
    assert reason_of(lambda: codec(clock).verify(token, KEYS.get)) == "session-expired"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
        lambda t: "x" + t,
        lambda t: t.replace(".", "", 1),
        lambda t: "",
        lambda t: "a" * (MAX_TOKEN_LENGTH + 1),
    ],
)
def test_tampered_cookie_is_refused(mangle: Callable[[str], str]) -> None:
    c = codec()
    token = mangle(c.issue(ALICE))
    with pytest.raises(AuthError) as info:
        c.verify(token, KEYS.get)
    assert info.value.reason == "bad-session"
    assert token[:20] not in info.value.message or not token


@pytest.mark.parametrize(
    "payload",
    [
        {"ak": "AKALICE"},
        {"ak": "AKALICE", "role": "owner", "uid": "u-alice", "dom": "dom", "kf": "x"},
        {"ak": 1, "role": "user", "uid": "u-alice", "dom": "dom", "kf": "x"},
        {"ak": "AK\nX", "role": "user", "uid": "u-alice", "dom": "dom", "kf": "x"},
        ["AKALICE"],
    ],
)
def test_validly_signed_but_malformed_payload_is_refused(payload: Any) -> None:
    c = codec()
    token = c._serializer.dumps(payload)
    assert reason_of(lambda: c.verify(token, KEYS.get)) == "bad-session"


def test_cookie_of_a_removed_key_is_refused() -> None:
    c = codec()
    token = c.issue(ALICE)
    assert reason_of(lambda: c.verify(token, {"AKROOT": ROOT}.get)) == "session-revoked"


def test_cookie_of_a_rotated_secret_is_refused() -> None:
    c = codec()
    token = c.issue(ALICE)
    rotated = Keypair("AKALICE", "a-brand-new-secret", ALICE.principal)
    assert reason_of(lambda: c.verify(token, {"AKALICE": rotated}.get)) == "session-revoked"


def test_cookie_of_a_changed_principal_is_refused() -> None:
    # Demoted (or moved to another domain) since logging in: log in again.
    c = codec()
    token = c.issue(ROOT)
    demoted = Keypair("AKROOT", ROOT.secret_key, Principal("AKROOT", Role.USER, "u-root", "dom"))
    assert reason_of(lambda: c.verify(token, {"AKROOT": demoted}.get)) == "session-revoked"


def test_short_session_key_is_refused() -> None:
    with pytest.raises(ValueError, match="32"):
        SessionCodec("short", 60)


# --- JWT ------------------------------------------------------------------------------


def claims(**overrides: Any) -> dict[str, Any]:
    base = {
        "sub": "AKJWT",
        "role": "admin",
        "user_id": "u-jwt",
        "domain": "research",
        "exp": int(time.time()) + 300,
    }
    return {k: v for k, v in (base | overrides).items() if v is not None}


def token(payload: dict[str, Any], key: str = JWT_KEY, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def test_jwt_gives_its_principal() -> None:
    assert JwtVerifier(JWT_KEY).verify(token(claims())) == Principal(
        "AKJWT", Role.ADMIN, "u-jwt", "research"
    )


def test_jwt_access_key_claim_instead_of_sub() -> None:
    principal = JwtVerifier(JWT_KEY).verify(token(claims(sub=None, access_key="AKJ2")))
    assert principal.access_key == "AKJ2"


def test_jwt_sub_and_access_key_must_agree() -> None:
    verifier = JwtVerifier(JWT_KEY)
    assert verifier.verify(token(claims(access_key="AKJWT"))).access_key == "AKJWT"
    assert reason_of(lambda: verifier.verify(token(claims(access_key="AKOTHER")))) == "bad-claims"


def unsigned(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: unsigned(claims()), "bad-token"),
        (lambda: token(claims(), key="w" * 40), "bad-token"),
        (lambda: token(claims(), algorithm="HS512"), "bad-token"),  # not configured
        (lambda: "not.a.jwt", "bad-token"),
        (lambda: "x" * (MAX_TOKEN_LENGTH + 1), "bad-token"),
        (lambda: token(claims(exp=int(time.time()) - 10)), "token-expired"),
        (lambda: token(claims(exp=None)), "bad-claims"),
        (lambda: token(claims(role="root")), "bad-claims"),
        (lambda: token(claims(role=None)), "bad-claims"),
        (lambda: token(claims(user_id=None)), "bad-claims"),
        (lambda: token(claims(domain="")), "bad-claims"),
        (lambda: token(claims(sub=None)), "bad-claims"),
        (lambda: token(claims(sub=42)), "bad-claims"),
        (lambda: token(claims(nbf=int(time.time()) + 600)), "bad-claims"),
        (lambda: token(claims(aud="someone-else")), "bad-claims"),
    ],
)
def test_bad_jwts_are_refused_with_a_reason(make: Callable[[], str], reason: str) -> None:
    bad = make()
    with pytest.raises(AuthError) as info:
        JwtVerifier(JWT_KEY).verify(bad)
    assert info.value.reason == reason
    assert bad not in info.value.message


def test_jwt_issuer_and_audience_when_configured() -> None:
    verifier = JwtVerifier(JWT_KEY, issuer="https://idp.example", audience="kep")
    good = claims(iss="https://idp.example", aud="kep")
    assert verifier.verify(token(good)).access_key == "AKJWT"
    for bad in (claims(iss="https://evil.example", aud="kep"), claims(aud="kep"), claims()):
        with pytest.raises(AuthError) as info:
            verifier.verify(token(bad))
        assert info.value.reason == "bad-claims"


def test_jwt_only_hmac_algorithms_can_be_configured() -> None:
    for algorithms in (["none"], ["RS256"], []):
        with pytest.raises(ValueError, match="algorithms"):
            JwtVerifier(JWT_KEY, algorithms)
    with pytest.raises(ValueError, match="64 bytes"):
        JwtVerifier("j" * 40, ["HS512"])
    verifier = JwtVerifier(JWT_KEY, ["HS256", "HS512"])
    assert verifier.verify(token(claims(), algorithm="HS512")).role is Role.ADMIN


def test_principal_from_claims_refuses_control_characters() -> None:
    base = claims()
    assert reason_of(lambda: principal_from_claims(base | {"user_id": "u\n1"})) == "bad-claims"


# --- Dispatch -------------------------------------------------------------------------


def dispatch(authorization: str | None, cookie: str | None, **kw: Any) -> Principal | None:
    options: dict[str, Any] = {"bearer": JwtVerifier(JWT_KEY), "codec": codec()} | kw
    return authenticate_browser(authorization, cookie, lookup=KEYS.get, **options)


def test_dispatch_backendai_header_goes_to_request_signing() -> None:
    cookie = codec().issue(ALICE)
    assert dispatch("BackendAI signMethod=HMAC-SHA256, credential=AK:00", cookie) is None


def test_dispatch_bearer_goes_to_jwt() -> None:
    assert dispatch(f"Bearer {token(claims())}", None) == principal_from_claims(claims())
    assert dispatch(f"bearer  {token(claims())} ", None) is not None
    # No JWT key configured: request signing answers (it calls the header malformed).
    assert dispatch(f"Bearer {token(claims())}", None, bearer=None) is None


def test_dispatch_cookie_when_no_authorization() -> None:
    assert dispatch(None, codec().issue(ALICE)) == ALICE.principal
    assert reason_of(lambda: dispatch(None, "garbage")) == "bad-session"


def test_dispatch_nothing_goes_to_request_signing() -> None:
    # Request signing then answers "missing"; a cookie without sessions configured too.
    assert dispatch(None, None) is None
    assert dispatch(None, codec().issue(ALICE), codec=None) is None


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("BEARER abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("BackendAI signMethod=HMAC-SHA256") is None
