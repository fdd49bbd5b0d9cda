"""Request verification does the same work whatever is wrong with the signature.

Not timed (wall-clock timing tests are flaky and prove little): every HMAC computed and
every comparison made is recorded, with the lengths involved, and the records of a
wrong signature, an unknown access key and a right signature must be identical. That
is what "constant time" rests on: the same HMAC computations (a dummy secret stands in
for an unknown key), and one ``hmac.compare_digest`` of equal-length values.
"""

from __future__ import annotations

import contextlib
import hmac as real_hmac
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from proxy import signing
from proxy.policy import Principal, Role
from proxy.signing import AuthError, Keypair, sign_headers, verify

NOW = datetime(2024, 5, 17, 12, 0, tzinfo=UTC)
HOST = "proxy.example:8080"
TARGET = "/stream/kernel/_/events?sessionId=*"
ALICE = Keypair("AKALICE", "alice-secret-xxxxxxxxxx", Principal("AKALICE", Role.USER, "a", "d"))


def headers(access_key: str, secret: str) -> dict[str, str]:
    signed = sign_headers(
        method="GET",
        raw_target=TARGET,
        host=HOST,
        access_key=access_key,
        secret_key=secret,
        date=NOW,
    )
    return {k.lower(): v for k, v in signed.items()} | {"host": HOST}


def traced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    trace: list[tuple[Any, ...]] = []

    def new(key: bytes, msg: bytes, digestmod: Any) -> Any:
        # HMAC pads a key of up to one block (64 bytes for SHA-256) to the block: any
        # such key is the same work. A longer one is hashed first, one more compression.
        key_work = "block" if len(key) <= 64 else "hashed"
        trace.append(("hmac", key_work, len(msg), digestmod))
        return real_hmac.new(key, msg, digestmod)

    def compare(a: bytes, b: bytes) -> bool:
        trace.append(("compare", type(a), len(a), type(b), len(b)))
        return real_hmac.compare_digest(a, b)

    monkeypatch.setattr(signing, "hmac", SimpleNamespace(new=new, compare_digest=compare))
    return trace


def run(headers: dict[str, str], trace: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    trace.clear()

    def lookup(key: str) -> Keypair | None:
        trace.append(("lookup",))
        return ALICE if key == ALICE.access_key else None

    with contextlib.suppress(AuthError):
        verify(method="GET", raw_target=TARGET, headers=headers, lookup=lookup, now=NOW)
    return list(trace)


def test_wrong_secret_unknown_key_and_success_do_the_same_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace = traced(monkeypatch)
    cases = {
        "right": headers("AKALICE", ALICE.secret_key),
        "wrong secret": headers("AKALICE", "not-alices-secret-xxxxxx"),
        # The same length as the real secret, and a different one: neither matters.
        "unknown key": headers("AKBOB", "bobs-secret-xxxxxxxxxxx"),
        "unknown, long secret": headers("AKNOBODY", "y" * 200),
    }
    traces = {name: run(h, trace) for name, h in cases.items()}
    # Three HMACs (date key, host key, signature) and one comparison of 64 hex digits.
    assert traces["right"][0] == ("lookup",)
    assert [t[0] for t in traces["right"][1:]] == ["hmac", "hmac", "hmac", "compare"]
    assert traces["right"][-1] == ("compare", bytes, 64, bytes, 64)
    for name, got in traces.items():
        assert got == traces["right"], name


def test_the_dummy_secret_costs_what_a_real_one_does() -> None:
    # Both fit in one HMAC block, so an unknown key's first HMAC is a known key's.
    assert len(signing._DUMMY_SECRET.encode()) <= 64


def test_a_malformed_header_is_refused_before_any_hmac(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cheap refusals first: a garbage header costs no HMAC, for known and unknown keys alike.
    trace = traced(monkeypatch)
    for auth in ("garbage", "BackendAI signMethod=HMAC-SHA256, credential=AKALICE:abc"):
        got = run(headers("AKALICE", ALICE.secret_key) | {"authorization": auth}, trace)
        assert got == []
