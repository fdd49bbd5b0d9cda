"""Backend.AI request signing (HMAC-SHA256), as the official client SDK does it. Pure.

String to sign (lines joined by LF): METHOD, the raw request target (path and raw
query, exactly as received), the raw date header value, ``host:<Host>``,
``content-type:<lower-cased type>``, ``x-backendai-version:<version>``, and the hex
SHA-256 of the (empty) body. Key: HMAC(secret, date as YYYYMMDD), then HMAC(key, host).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Final

from .policy import Principal

DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
MAX_SKEW: Final = timedelta(minutes=15)
MAX_HEADER_LENGTH: Final = 1024
_EMPTY_BODY_HASH: Final = hashlib.sha256(b"").hexdigest()
_AUTH_RE: Final = re.compile(
    r"BackendAI\s+signMethod=HMAC-SHA256\s*,\s*credential=([^:\s,]{1,128}):([0-9a-fA-F]{64})\s*"
)
# Compared against when the access key is unknown, so that a miss costs the same.
_DUMMY_SECRET: Final = "dummy-secret-for-constant-time-compare"  # noqa: S105 - not a credential


@dataclass(frozen=True, slots=True)
class Keypair:
    access_key: str
    secret_key: str = field(repr=False)  # never in logs
    principal: Principal


class AuthError(Exception):
    """Why a request is not authenticated. ``reason`` is a short stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_date(raw: str) -> datetime:
    """ISO 8601 (what the SDK sends) or RFC 1123 (the HTTP Date format); naive is UTC."""
    value = raw.strip()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError) as exc:
            raise AuthError("bad-date", f"unparseable date header {raw[:64]!r}") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def string_to_sign(
    method: str, raw_target: str, raw_date: str, host: str, content_type: str, version: str
) -> bytes:
    return "\n".join(
        (
            method.upper(),
            raw_target,
            raw_date,
            f"host:{host}",
            f"content-type:{content_type.lower()}",
            f"x-backendai-version:{version}",
            _EMPTY_BODY_HASH,
        )
    ).encode("utf-8", "surrogateescape")


def signature(secret_key: str, date: datetime, host: str, to_sign: bytes) -> str:
    key = hmac.new(secret_key.encode(), date.strftime("%Y%m%d").encode(), hashlib.sha256).digest()
    key = hmac.new(key, host.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    return hmac.new(key, to_sign, hashlib.sha256).hexdigest()


def sign_headers(
    *,
    method: str,
    raw_target: str,
    host: str,
    access_key: str,
    secret_key: str,
    date: datetime,
    version: str = "v4.20190615",
    content_type: str = DEFAULT_CONTENT_TYPE,
) -> dict[str, str]:
    """Headers for a signed request, as the SDK would send them (used by our clients)."""
    raw_date = date.isoformat()
    sig = signature(
        secret_key,
        date,
        host,
        string_to_sign(method, raw_target, raw_date, host, content_type, version),
    )
    return {
        "Date": raw_date,
        "X-BackendAI-Version": version,
        "Authorization": f"BackendAI signMethod=HMAC-SHA256, credential={access_key}:{sig}",
    }


def verify(
    *,
    method: str,
    raw_target: str,
    headers: Mapping[str, str],
    lookup: Callable[[str], Keypair | None],
    now: datetime,
    max_skew: timedelta = MAX_SKEW,
) -> Principal:
    """Authenticate a request; ``headers`` has lower-cased names. Raises AuthError."""
    auth = headers.get("authorization")
    if auth is None:
        raise AuthError("missing", "missing Authorization header")
    if len(auth) > MAX_HEADER_LENGTH:
        raise AuthError("malformed", "Authorization header is too long")
    match = _AUTH_RE.fullmatch(auth)
    if match is None:
        raise AuthError(
            "malformed",
            "Authorization must be 'BackendAI signMethod=HMAC-SHA256, "
            "credential=<access key>:<hex signature>'",
        )
    access_key, claimed = match.group(1), match.group(2).lower()
    raw_date = headers.get("date") or headers.get("x-backendai-date")
    if not raw_date:
        raise AuthError("bad-date", "missing Date or X-BackendAI-Date header")
    if len(raw_date) > 64:
        raise AuthError("bad-date", "date header is too long")
    date = parse_date(raw_date)
    if abs(now - date) > max_skew:
        raise AuthError("stale-date", "request date is too far from the server's clock")
    host = headers.get("host", "")
    to_sign = string_to_sign(
        method,
        raw_target,
        raw_date,
        host,
        headers.get("content-type", DEFAULT_CONTENT_TYPE),
        headers.get("x-backendai-version", ""),
    )
    keypair = lookup(access_key)
    expected = signature(keypair.secret_key if keypair else _DUMMY_SECRET, date, host, to_sign)
    if not hmac.compare_digest(expected.encode(), claimed.encode()) or keypair is None:
        # One reason for both: telling "no such key" apart would let anyone probe keys.
        raise AuthError("bad-signature", "signature does not match or access key is unknown")
    return keypair.principal
