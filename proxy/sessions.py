"""Browser and token authentication: login, session cookies, JWT bearer tokens. Pure.

- ``check_credentials``: an access key and secret key (the login form) -> the keypair.
  The same work whether the key exists or not: both secrets are hashed to a fixed
  length and compared with ``hmac.compare_digest``, against a dummy for unknown keys.
- ``SessionCodec``: the session cookie, an itsdangerous ``URLSafeTimedSerializer``
  token (HMAC-SHA256, timestamped) carrying the principal. It needs no server-side
  state, so it survives restarts and every replica with the same key accepts it. On
  every use the access key must still be configured, with the same principal and the
  same secret (a fingerprint of it is in the token): removing or rotating a keypair
  ends its sessions.
- ``JwtVerifier``: ``Authorization: Bearer <JWT>`` from an identity provider that shares
  an HMAC key with the proxy (PyJWT). ``exp`` is required; only the configured
  algorithms are accepted, so ``alg: none`` never is. Its claims are the principal.
- ``parse_login``: the login request body, strictly.

Failures raise ``signing.AuthError`` with a short reason code, like request signing.
No message ever contains a token or a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt
from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

from .policy import Principal, Role
from .signing import AuthError, Keypair

MAX_TOKEN_LENGTH: Final = 4096
MAX_LOGIN_BODY: Final = 4096
MAX_FIELD_LENGTH: Final = 256
# Changing this invalidates every cookie: a new token format gets a new salt.
SESSION_SALT: Final = "kernel-events-proxy.session.v1"
_FINGERPRINT_CONTEXT: Final = b"kernel-events-proxy.session-key-fingerprint"
# Compared against when the access key is unknown, so that a miss costs the same.
_DUMMY_SECRET: Final = "dummy-secret-for-constant-time-login"  # noqa: S105 - not a credential
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")

Lookup = Callable[[str], Keypair | None]


# --- Login ----------------------------------------------------------------------------


class LoginRequestError(ValueError):
    """The login request itself is malformed; ``status`` and ``error`` for the answer."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass(frozen=True, slots=True)
class LoginRequest:
    access_key: str
    secret_key: str

    def __repr__(self) -> str:  # the secret never reaches a log line
        return f"LoginRequest(access_key={self.access_key!r}, secret_key=***)"


def parse_login(body: bytes, content_type: str | None) -> LoginRequest:
    """``{"access_key": str, "secret_key": str}`` as JSON, nothing else.

    JSON only: a cross-site HTML form cannot send ``application/json`` without a CORS
    preflight, so a foreign page cannot post a login (login CSRF).
    """
    mimetype = (content_type or "").split(";", 1)[0].strip().lower()
    if mimetype != "application/json":
        raise LoginRequestError(
            415, "unsupported-media-type", "the login body must be application/json"
        )
    if len(body) > MAX_LOGIN_BODY:
        raise LoginRequestError(
            400, "body-too-large", f"the login body is larger than {MAX_LOGIN_BODY} bytes"
        )
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise LoginRequestError(400, "bad-json", "the login body is not valid JSON") from None
    except RecursionError:  # `[[[[...`: nesting deeper than the parser recurses
        raise LoginRequestError(
            400, "bad-json", "the login body is nested too deeply to be a login"
        ) from None
    if not isinstance(data, dict):
        raise LoginRequestError(400, "bad-body", "the login body must be a JSON object")
    unknown = sorted(str(k) for k in data if k not in ("access_key", "secret_key"))
    if unknown:
        raise LoginRequestError(400, "unknown-field", f"unknown field(s): {', '.join(unknown)}")
    values = []
    for name in ("access_key", "secret_key"):
        if name not in data:
            raise LoginRequestError(400, "missing-field", f"missing field {name!r}")
        value = data[name]
        if not isinstance(value, str):
            raise LoginRequestError(400, "bad-field", f"field {name!r} must be a string")
        if not value or len(value) > MAX_FIELD_LENGTH:
            raise LoginRequestError(
                400, "bad-field", f"field {name!r} must be 1 to {MAX_FIELD_LENGTH} characters"
            )
        values.append(value)
    return LoginRequest(values[0], values[1])


def _digest(secret: str) -> bytes:
    # Fixed length, so compare_digest's time says nothing about the secrets' lengths.
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def check_credentials(access_key: str, secret_key: str, lookup: Lookup) -> Keypair:
    """The keypair these credentials name, or AuthError("bad-credentials").

    A known key with a wrong secret and an unknown key do the same work and give the
    same answer: the response must not tell which access keys exist.
    """
    keypair = lookup(access_key)
    expected = keypair.secret_key if keypair is not None else _DUMMY_SECRET
    matches = hmac.compare_digest(_digest(expected), _digest(secret_key))
    if not matches or keypair is None:
        raise AuthError("bad-credentials", "access key or secret key is wrong")
    return keypair


# --- Session cookies ------------------------------------------------------------------


def _fingerprint(keypair: Keypair) -> str:
    """Names the keypair's current secret without revealing it (rotation ends sessions)."""
    mac = hmac.new(keypair.secret_key.encode(), _FINGERPRINT_CONTEXT, hashlib.sha256)
    return mac.hexdigest()[:16]


def _clean(value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD_LENGTH:
        return None
    return None if _CONTROL.search(value) else value


def _role(value: object) -> Role | None:
    try:
        return Role(value) if isinstance(value, str) else None
    except ValueError:
        return None


class SessionCodec:
    """Issues and verifies session cookie values (signed, timestamped, stateless)."""

    def __init__(
        self, secret_key: str, max_age: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        if len(secret_key) < 32:
            raise ValueError("the session signing key must be at least 32 characters")
        self.max_age = max_age

        class _Signer(TimestampSigner):
            def get_timestamp(self) -> int:
                return int(clock())

        self._serializer = URLSafeTimedSerializer(
            secret_key,
            salt=SESSION_SALT,
            signer=_Signer,
            signer_kwargs={"digest_method": hashlib.sha256},
        )

    def issue(self, keypair: Keypair) -> str:
        p = keypair.principal
        payload = {
            "ak": p.access_key,
            "role": p.role.value,
            "uid": p.user_id,
            "dom": p.domain,
            "kf": _fingerprint(keypair),
        }
        return self._serializer.dumps(payload)

    def verify(self, token: str, lookup: Lookup) -> Principal:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("bad-session", "the session cookie is malformed")
        try:
            payload = self._serializer.loads(token, max_age=self.max_age)
        except SignatureExpired:
            raise AuthError("session-expired", "the session has expired: log in again") from None
        except BadSignature:
            raise AuthError("bad-session", "the session cookie is not valid") from None
        if not isinstance(payload, dict):
            raise AuthError("bad-session", "the session cookie is not valid")
        access_key, user_id, domain = (_clean(payload.get(k)) for k in ("ak", "uid", "dom"))
        role, fingerprint = _role(payload.get("role")), payload.get("kf")
        if not (access_key and user_id and domain and role and isinstance(fingerprint, str)):
            raise AuthError("bad-session", "the session cookie is not valid")
        # Deny by default: the key must still be configured, unchanged.
        keypair = lookup(access_key)
        if (
            keypair is None
            or not hmac.compare_digest(_fingerprint(keypair).encode(), fingerprint.encode())
            or keypair.principal != Principal(access_key, role, user_id, domain)
        ):
            raise AuthError(
                "session-revoked", "the session's access key is no longer valid: log in again"
            )
        return keypair.principal


# --- JWT bearer tokens ----------------------------------------------------------------

HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
# RFC 7518 3.2: a key at least as long as the hash (PyJWT warns below it).
_MIN_KEY_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}


def min_key_bytes(algorithms: Sequence[str]) -> int:
    return max((_MIN_KEY_BYTES[a] for a in algorithms if a in _MIN_KEY_BYTES), default=32)


_CLAIM_ERRORS: Final = (
    jwt.MissingRequiredClaimError,
    jwt.InvalidIssuerError,
    jwt.InvalidAudienceError,
    jwt.ImmatureSignatureError,
    jwt.InvalidIssuedAtError,
    jwt.exceptions.InvalidSubjectError,
    jwt.exceptions.InvalidJTIError,
)


class JwtVerifier:
    """Verifies ``Authorization: Bearer`` tokens signed with a shared HMAC key."""

    def __init__(
        self,
        key: str,
        algorithms: Sequence[str] = ("HS256",),
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 0.0,
    ) -> None:
        bad = [a for a in algorithms if a not in HMAC_ALGORITHMS]
        if bad or not algorithms:
            raise ValueError(f"algorithms must be some of {', '.join(HMAC_ALGORITHMS)}")
        if len(key.encode()) < min_key_bytes(algorithms):
            raise ValueError(f"the key must be at least {min_key_bytes(algorithms)} bytes")
        self._key = key
        self._algorithms = list(algorithms)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._required = ["exp"] + (["iss"] if issuer else []) + (["aud"] if audience else [])

    def verify(self, token: str) -> Principal:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("bad-token", "the bearer token is malformed")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": self._required},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token-expired", "the bearer token has expired") from None
        except _CLAIM_ERRORS as exc:
            raise AuthError(
                "bad-claims", f"the bearer token's claims are not valid: {exc}"
            ) from None
        except jwt.InvalidTokenError:
            # Wrong key, a disallowed algorithm (``none`` included), not a JWT at all.
            raise AuthError("bad-token", "the bearer token is not valid") from None
        return principal_from_claims(claims)


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """``sub`` or ``access_key`` (equal if both), ``role``, ``user_id``, ``domain``."""
    subject, access_key = claims.get("sub"), claims.get("access_key")
    if subject is not None and access_key is not None and subject != access_key:
        raise AuthError("bad-claims", "claims 'sub' and 'access_key' differ")
    key = _clean(access_key if access_key is not None else subject)
    if key is None:
        raise AuthError("bad-claims", "claim 'sub' or 'access_key' is missing or not valid")
    role = _role(claims.get("role"))
    if role is None:
        roles = ", ".join(r.value for r in Role)
        raise AuthError("bad-claims", f"claim 'role' must be one of {roles}")
    user_id, domain = _clean(claims.get("user_id")), _clean(claims.get("domain"))
    if user_id is None:
        raise AuthError("bad-claims", "claim 'user_id' is missing or not valid")
    if domain is None:
        raise AuthError("bad-claims", "claim 'domain' is missing or not valid")
    return Principal(key, role, user_id, domain)


def bearer_token(authorization: str) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive), else None."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def authenticate_browser(
    authorization: str | None,
    cookie: str | None,
    *,
    bearer: JwtVerifier | None,
    codec: SessionCodec | None,
    lookup: Lookup,
) -> Principal | None:
    """A bearer JWT's or the session cookie's principal; None: use request signing.

    ``Authorization: Bearer`` -> the JWT; any other ``Authorization`` (``BackendAI
    ...``), or a bearer token when no JWT key is configured -> None: request signing
    decides (and calls it malformed); no header and a session cookie -> the cookie;
    nothing -> None (signing answers "missing").
    """
    if authorization is not None:
        token = bearer_token(authorization)
        return None if token is None or bearer is None else bearer.verify(token)
    if cookie is not None and codec is not None:
        return codec.verify(cookie, lookup)
    return None
