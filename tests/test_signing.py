"""Request signing against an independent reference of the official SDK's signer."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy import Principal, Role
from proxy.signing import AuthError, Keypair, sign_headers, verify

TARGET = "/stream/kernel/_/events?sessionId=*&owner_access_key=AK1"
HOST = "127.0.0.1:8080"
VERSION = "v4.20190615"
NOW = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)
ACCESS_KEY = "AK1"
SECRET = "secret-key-of-ak1-xxxxxxxx"
PRINCIPAL = Principal(ACCESS_KEY, Role.USER, "u1", "default")
KEYS = {ACCESS_KEY: Keypair(ACCESS_KEY, SECRET, PRINCIPAL)}
FIFTEEN_MINUTES = timedelta(minutes=15)


def lookup(access_key: str) -> Keypair | None:
    return KEYS.get(access_key)


# --- Reference signer: backend.ai-client's auth.generate_signature, transcribed -------


def sdk_signature(
    *,
    method: str,
    rel_url: str,
    raw_date: str,
    key_date: datetime,
    host: str,
    secret_key: str,
    content_type: str = "application/octet-stream",
    version: str = VERSION,
) -> str:
    body_hash = hashlib.sha256(b"").hexdigest()
    sign_str = "{}\n{}\n{}\nhost:{}\ncontent-type:{}\nx-backendai-version:{}\n{}".format(  # noqa: UP032
        method.upper(), rel_url, raw_date, host, content_type.lower(), version, body_hash
    )
    sign_key = hmac.new(
        secret_key.encode(), key_date.strftime("%Y%m%d").encode(), "sha256"
    ).digest()
    sign_key = hmac.new(sign_key, host.encode(), "sha256").digest()
    return hmac.new(sign_key, sign_str.encode(), "sha256").hexdigest()


def sdk_headers(
    *,
    method: str = "GET",
    rel_url: str = TARGET,
    date: datetime = NOW,
    raw_date: str | None = None,
    host: str = HOST,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET,
    content_type: str = "application/octet-stream",
    version: str = VERSION,
    date_header: str = "date",
) -> dict[str, str]:
    """Lower-cased request headers as the SDK sends them for an event stream."""
    raw = date.isoformat() if raw_date is None else raw_date
    sig = sdk_signature(
        method=method,
        rel_url=rel_url,
        raw_date=raw,
        key_date=date,
        host=host,
        secret_key=secret_key,
        content_type=content_type,
        version=version,
    )
    return {
        date_header: raw,
        "host": host,
        "x-backendai-version": version,
        "authorization": f"BackendAI signMethod=HMAC-SHA256, credential={access_key}:{sig}",
        # No content-type: the SDK signs application/octet-stream but never sends it.
    }


def check(
    headers: dict[str, str],
    *,
    method: str = "GET",
    raw_target: str = TARGET,
    now: datetime = NOW,
    max_skew: timedelta = FIFTEEN_MINUTES,
) -> Principal:
    return verify(
        method=method,
        raw_target=raw_target,
        headers=headers,
        lookup=lookup,
        now=now,
        max_skew=max_skew,
    )


def reason_of(
    headers: dict[str, str],
    *,
    method: str = "GET",
    raw_target: str = TARGET,
    now: datetime = NOW,
) -> str:
    with pytest.raises(AuthError) as info:
        check(headers, method=method, raw_target=raw_target, now=now)
    return info.value.reason


def with_signature(
    headers: dict[str, str], sig: str, access_key: str = ACCESS_KEY
) -> dict[str, str]:
    auth = f"BackendAI signMethod=HMAC-SHA256, credential={access_key}:{sig}"
    return headers | {"authorization": auth}


def test_reference_matches_a_known_vector() -> None:
    # Pins the reference itself, so a change to it cannot silently follow the module.
    sig = sdk_signature(
        method="GET",
        rel_url=TARGET,
        raw_date="2024-05-17T12:30:45.123456+00:00",
        key_date=NOW,
        host=HOST,
        secret_key=SECRET,
    )
    to_sign = (
        "GET\n" + TARGET + "\n2024-05-17T12:30:45.123456+00:00\nhost:127.0.0.1:8080\n"
        "content-type:application/octet-stream\nx-backendai-version:v4.20190615\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    k = hmac.new(SECRET.encode(), b"20240517", hashlib.sha256).digest()
    k = hmac.new(k, b"127.0.0.1:8080", hashlib.sha256).digest()
    assert sig == hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()


# --- sign_headers agrees with the SDK --------------------------------------------------


def test_sign_headers_produces_the_sdk_signature_for_the_raw_star_target() -> None:
    headers = sign_headers(
        method="GET",
        raw_target=TARGET,
        host=HOST,
        access_key=ACCESS_KEY,
        secret_key=SECRET,
        date=NOW,
    )
    expected = sdk_headers()
    assert headers == {
        "Date": expected["date"],
        "X-BackendAI-Version": VERSION,
        "Authorization": expected["authorization"],
    }


def test_sign_headers_date_is_iso_8601_with_offset() -> None:
    headers = sign_headers(
        method="GET", raw_target="/", host=HOST, access_key="A", secret_key=SECRET, date=NOW
    )
    assert headers["Date"] == "2024-05-17T12:30:45.123456+00:00"


def test_sign_headers_sends_no_content_type_like_the_sdk() -> None:
    headers = sign_headers(
        method="GET", raw_target="/", host=HOST, access_key="A", secret_key=SECRET, date=NOW
    )
    assert {name.lower() for name in headers} == {"date", "x-backendai-version", "authorization"}


def test_sign_headers_lower_cases_method_and_content_type_as_the_sdk() -> None:
    headers = sign_headers(
        method="get",
        raw_target=TARGET,
        host=HOST,
        access_key=ACCESS_KEY,
        secret_key=SECRET,
        date=NOW,
        content_type="Application/JSON",
        version="v9.20990101",
    )
    expected = sdk_headers(method="GET", content_type="application/json", version="v9.20990101")
    assert headers["Authorization"] == expected["authorization"]


def test_signed_headers_verify() -> None:
    headers = sign_headers(
        method="GET",
        raw_target=TARGET,
        host=HOST,
        access_key=ACCESS_KEY,
        secret_key=SECRET,
        date=NOW,
    )
    lowered = {k.lower(): v for k, v in headers.items()} | {"host": HOST}
    assert check(lowered) == PRINCIPAL


access_keys = st.from_regex(r"[A-Za-z0-9_.-]{1,128}", fullmatch=True)
secrets = st.text(min_size=8, max_size=64)
targets = st.from_regex(r"/[!-~]{0,200}", fullmatch=True)
hosts = st.from_regex(r"[a-z0-9.-]{1,50}(:[0-9]{1,5})?", fullmatch=True)
skews = st.integers(-15 * 60 * 10**6, 15 * 60 * 10**6).map(lambda us: timedelta(microseconds=us))
offsets = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@given(
    access_key=access_keys,
    secret=secrets,
    target=targets,
    host=hosts,
    skew=skews,
    offset=offsets,
    method=st.sampled_from(["GET", "POST", "get", "Delete"]),
)
def test_sign_headers_and_verify_agree_with_the_sdk_for_any_request(
    access_key: str,
    secret: str,
    target: str,
    host: str,
    skew: timedelta,
    offset: timezone,
    method: str,
) -> None:
    date = (NOW + skew).astimezone(offset)
    ours = sign_headers(
        method=method,
        raw_target=target,
        host=host,
        access_key=access_key,
        secret_key=secret,
        date=date,
    )
    sdk = sdk_headers(
        method=method,
        rel_url=target,
        date=date,
        host=host,
        access_key=access_key,
        secret_key=secret,
    )
    assert ours["Authorization"] == sdk["authorization"]
    principal = Principal(access_key, Role.ADMIN, "u", "d")
    result = verify(
        method=method,
        raw_target=target,
        headers=sdk,
        lookup=lambda ak: Keypair(access_key, secret, principal) if ak == access_key else None,
        now=NOW,
    )
    assert result == principal


# --- verify accepts what the SDK sends -------------------------------------------------


def test_sdk_request_without_content_type_verifies() -> None:
    assert check(sdk_headers()) == PRINCIPAL


def test_explicit_octet_stream_content_type_verifies() -> None:
    assert check(sdk_headers() | {"content-type": "application/octet-stream"}) == PRINCIPAL


def test_content_type_is_compared_lower_cased() -> None:
    assert check(sdk_headers() | {"content-type": "Application/Octet-Stream"}) == PRINCIPAL


def test_other_content_type_is_signed_as_sent() -> None:
    headers = sdk_headers(content_type="application/json") | {"content-type": "application/json"}
    assert check(headers) == PRINCIPAL


def test_content_type_differing_from_the_signed_one_is_rejected() -> None:
    assert reason_of(sdk_headers() | {"content-type": "application/json"}) == "bad-signature"


def test_missing_content_type_is_not_treated_as_empty() -> None:
    assert reason_of(sdk_headers(content_type="")) == "bad-signature"


def test_raw_star_target_is_verified_as_received() -> None:
    assert check(sdk_headers(rel_url=TARGET), raw_target=TARGET) == PRINCIPAL


def test_target_is_never_re_encoded_before_verifying() -> None:
    encoded = TARGET.replace("*", "%2A")
    # Signed raw, received percent-encoded (or the reverse): different bytes, no match.
    assert reason_of(sdk_headers(rel_url=TARGET), raw_target=encoded) == "bad-signature"
    assert reason_of(sdk_headers(rel_url=encoded), raw_target=TARGET) == "bad-signature"
    assert check(sdk_headers(rel_url=encoded), raw_target=encoded) == PRINCIPAL


def test_lower_case_method_is_signed_upper_cased() -> None:
    assert check(sdk_headers(method="GET"), method="get") == PRINCIPAL


def test_upper_case_hex_signature_is_accepted() -> None:
    headers = sdk_headers()
    sig = headers["authorization"].rsplit(":", 1)[1]
    assert check(with_signature(headers, sig.upper())) == PRINCIPAL


def test_x_backendai_date_is_used_when_date_is_absent() -> None:
    headers = sdk_headers(date_header="x-backendai-date")
    assert "date" not in headers
    assert check(headers) == PRINCIPAL


def test_date_header_takes_precedence_over_x_backendai_date() -> None:
    headers = sdk_headers() | {"x-backendai-date": "garbage"}
    assert check(headers) == PRINCIPAL
    signed_with_x = sdk_headers(date_header="x-backendai-date")
    other = (NOW + timedelta(seconds=1)).isoformat()
    assert reason_of(signed_with_x | {"date": other}) == "bad-signature"


def test_rfc_1123_date_is_accepted() -> None:
    raw = "Fri, 17 May 2024 12:30:45 GMT"
    headers = sdk_headers(raw_date=raw, date=datetime(2024, 5, 17, 12, 30, 45, tzinfo=UTC))
    assert check(headers) == PRINCIPAL


def test_naive_iso_date_is_taken_as_utc() -> None:
    raw = "2024-05-17T12:30:45"
    headers = sdk_headers(raw_date=raw, date=datetime(2024, 5, 17, 12, 30, 45))
    assert check(headers) == PRINCIPAL
    assert reason_of(headers, now=NOW + timedelta(hours=9)) == "stale-date"


def test_non_utc_offset_verifies_with_the_sdks_local_date_key() -> None:
    # 08:00 on 1 January in +09:00 is still 31 December in UTC: the key uses "20240101".
    seoul = timezone(timedelta(hours=9))
    date = datetime(2024, 1, 1, 8, 0, 0, tzinfo=seoul)
    now = date.astimezone(UTC)
    assert now.strftime("%Y%m%d") == "20231231"
    headers = sdk_headers(date=date)
    assert headers["date"].endswith("+09:00")
    assert check(headers, now=now) == PRINCIPAL


def test_non_utc_offset_signed_with_the_utc_date_key_is_rejected() -> None:
    seoul = timezone(timedelta(hours=9))
    date = datetime(2024, 1, 1, 8, 0, 0, tzinfo=seoul)
    sig = sdk_signature(
        method="GET",
        rel_url=TARGET,
        raw_date=date.isoformat(),
        key_date=date.astimezone(UTC),
        host=HOST,
        secret_key=SECRET,
    )
    headers = with_signature(sdk_headers(date=date), sig)
    assert reason_of(headers, now=date.astimezone(UTC)) == "bad-signature"


def test_missing_host_header_is_signed_as_empty_host() -> None:
    headers = sdk_headers(host="")
    del headers["host"]
    assert check(headers) == PRINCIPAL


def test_verify_returns_the_principal_of_the_matching_key() -> None:
    admin = Principal("AK2", Role.SUPERADMIN, "s1", "default")
    keys = {"AK2": Keypair("AK2", "other-secret-xxxx", admin)}
    headers = sdk_headers(access_key="AK2", secret_key="other-secret-xxxx")
    result = verify(method="GET", raw_target=TARGET, headers=headers, lookup=keys.get, now=NOW)
    assert result == admin


# --- Failures and their reasons --------------------------------------------------------


def test_missing_authorization_header() -> None:
    headers = sdk_headers()
    del headers["authorization"]
    assert reason_of(headers) == "missing"


@pytest.mark.parametrize(
    "auth",
    [
        pytest.param("", id="empty"),
        pytest.param("Bearer abc", id="wrong-scheme"),
        pytest.param("Basic QUsxOnNlY3JldA==", id="basic"),
        pytest.param("backendai signMethod=HMAC-SHA256, credential=AK1:{sig}", id="scheme-case"),
        pytest.param("BackendAI signMethod=HMAC-SHA1, credential=AK1:{sig}", id="sha1"),
        pytest.param("BackendAI signMethod=HMAC-SHA512, credential=AK1:{sig}", id="sha512"),
        pytest.param("BackendAI signMethod=HMAC-SHA256, credential=AK1:{sig}0", id="65-hex"),
        pytest.param("BackendAI signMethod=HMAC-SHA256, credential=AK1:{short}", id="63-hex"),
        pytest.param("BackendAI signMethod=HMAC-SHA256, credential=AK1:{nonhex}", id="non-hex"),
        pytest.param("BackendAI signMethod=HMAC-SHA256, credential=AK1{sig}", id="no-colon"),
        pytest.param("BackendAI signMethod=HMAC-SHA256, credential=:{sig}", id="no-access-key"),
        pytest.param("BackendAI signMethod=HMAC-SHA256, credential=AK1:", id="no-signature"),
        pytest.param("BackendAI signMethod=HMAC-SHA256", id="no-credential"),
        pytest.param("BackendAI credential=AK1:{sig}", id="no-sign-method"),
        pytest.param("BackendAI signMethod=HMAC-SHA256, credential=A K:{sig}", id="space-in-key"),
        pytest.param("BackendAI signMethod=HMAC-SHA256, credential=AK1:{sig}, x=y", id="extra"),
        pytest.param(" BackendAI signMethod=HMAC-SHA256, credential=AK1:{sig}", id="lead-space"),
        pytest.param(
            "BackendAI signMethod=HMAC-SHA256, credential=" + "A" * 129 + ":{sig}",
            id="access-key-too-long",
        ),
    ],
)
def test_malformed_authorization_header(auth: str) -> None:
    headers = sdk_headers()
    sig = headers["authorization"].rsplit(":", 1)[1]
    value = auth.format(sig=sig, short=sig[:63], nonhex="g" + sig[1:])
    assert reason_of(headers | {"authorization": value}) == "malformed"


def test_too_long_authorization_header_is_malformed_even_if_otherwise_valid() -> None:
    headers = sdk_headers()
    # Trailing whitespace is tolerated by the pattern; only the length check stops this.
    padded = headers["authorization"] + " " * 1100
    with pytest.raises(AuthError) as info:
        check(headers | {"authorization": padded})
    assert info.value.reason == "malformed"
    assert "too long" in info.value.message


def test_authorization_at_the_length_limit_is_parsed() -> None:
    headers = sdk_headers()
    padded = headers["authorization"].ljust(1024)
    assert check(headers | {"authorization": padded}) == PRINCIPAL


def test_unknown_access_key_is_bad_signature() -> None:
    headers = sdk_headers(access_key="AKNOBODY")
    assert reason_of(headers) == "bad-signature"


def test_wrong_secret_is_bad_signature() -> None:
    assert reason_of(sdk_headers(secret_key="not-the-secret-xxxxxx")) == "bad-signature"


def test_unknown_key_and_wrong_secret_are_indistinguishable() -> None:
    errors: list[AuthError] = []
    for headers in (sdk_headers(access_key="AKNOBODY"), sdk_headers(secret_key="wrong-secret")):
        with pytest.raises(AuthError) as info:
            check(headers)
        errors.append(info.value)
    assert errors[0].reason == errors[1].reason == "bad-signature"
    assert errors[0].message == errors[1].message
    assert str(errors[0]) == str(errors[1])


def test_unknown_key_signed_with_the_dummy_secret_is_still_rejected() -> None:
    headers = sdk_headers(
        access_key="AKNOBODY", secret_key="dummy-secret-for-constant-time-compare"
    )
    assert reason_of(headers) == "bad-signature"


def test_altered_path_is_bad_signature() -> None:
    headers = sdk_headers()
    altered = TARGET.replace("/events", "/event")
    assert reason_of(headers, raw_target=altered) == "bad-signature"


@pytest.mark.parametrize(
    "altered",
    [
        "/stream/kernel/_/events?sessionId=other&owner_access_key=AK1",
        "/stream/kernel/_/events?sessionId=*&owner_access_key=AK2",
        "/stream/kernel/_/events?owner_access_key=AK1&sessionId=*",
        "/stream/kernel/_/events?sessionId=*&owner_access_key=AK1&group=g1",
        "/stream/kernel/_/events",
    ],
)
def test_altered_query_is_bad_signature(altered: str) -> None:
    assert reason_of(sdk_headers(), raw_target=altered) == "bad-signature"


def test_different_host_is_bad_signature() -> None:
    headers = sdk_headers() | {"host": "127.0.0.1:8081"}
    assert reason_of(headers) == "bad-signature"


def test_different_method_is_bad_signature() -> None:
    assert reason_of(sdk_headers(), method="POST") == "bad-signature"


def test_different_version_header_is_bad_signature() -> None:
    headers = sdk_headers() | {"x-backendai-version": "v5.20191215"}
    assert reason_of(headers) == "bad-signature"


def test_missing_version_header_is_signed_as_empty() -> None:
    headers = sdk_headers(version="")
    del headers["x-backendai-version"]
    assert check(headers) == PRINCIPAL
    assert reason_of(sdk_headers() | {"x-backendai-version": ""}) == "bad-signature"


def test_reformatted_date_with_the_same_instant_is_bad_signature() -> None:
    headers = sdk_headers()
    # The raw header is signed, not the parsed instant.
    same_instant = NOW.astimezone(timezone(timedelta(hours=1))).isoformat()
    assert reason_of(headers | {"date": same_instant}) == "bad-signature"


@given(position=st.integers(0, 63), replacement=st.sampled_from("0123456789abcdef"))
def test_any_changed_signature_digit_is_bad_signature(position: int, replacement: str) -> None:
    headers = sdk_headers()
    sig = headers["authorization"].rsplit(":", 1)[1]
    if sig[position] == replacement:
        return
    changed = sig[:position] + replacement + sig[position + 1 :]
    assert reason_of(with_signature(headers, changed)) == "bad-signature"


@pytest.mark.parametrize("sign", [1, -1])
def test_date_just_beyond_fifteen_minutes_is_stale(sign: int) -> None:
    date = NOW + sign * (FIFTEEN_MINUTES + timedelta(microseconds=1))
    assert reason_of(sdk_headers(date=date)) == "stale-date"


@pytest.mark.parametrize("sign", [1, -1])
def test_date_exactly_fifteen_minutes_away_is_accepted(sign: int) -> None:
    date = NOW + sign * FIFTEEN_MINUTES
    assert check(sdk_headers(date=date)) == PRINCIPAL


def test_date_hours_away_is_stale() -> None:
    assert reason_of(sdk_headers(date=NOW - timedelta(days=1))) == "stale-date"
    assert reason_of(sdk_headers(date=NOW + timedelta(hours=2))) == "stale-date"


def test_stale_check_compares_instants_not_wall_clocks() -> None:
    far_east = NOW.astimezone(timezone(timedelta(hours=14)))
    assert check(sdk_headers(date=far_east)) == PRINCIPAL


def test_max_skew_parameter_is_honoured() -> None:
    headers = sdk_headers(date=NOW - timedelta(seconds=61))
    with pytest.raises(AuthError) as info:
        check(headers, max_skew=timedelta(seconds=60))
    assert info.value.reason == "stale-date"
    assert check(headers, max_skew=timedelta(seconds=61)) == PRINCIPAL


def test_stale_date_is_rejected_even_with_a_valid_signature() -> None:
    old = sdk_headers(date=NOW - timedelta(hours=1))
    assert reason_of(old) == "stale-date"


@pytest.mark.parametrize(
    "raw",
    [
        "yesterday",
        "2024-13-01T00:00:00+00:00",
        "2024-05-17T25:00:00+00:00",
        "Fri, 32 May 2024 12:30:45 GMT",
        "12:30:45",
        "   ",
        "2024-05-17T12:30:45+25:00",
        "\x00",
    ],
)
def test_unparseable_date_is_bad_date(raw: str) -> None:
    assert reason_of(sdk_headers(raw_date=raw)) == "bad-date"


@pytest.mark.parametrize("header", ["date", "x-backendai-date"])
def test_too_long_date_is_bad_date(header: str) -> None:
    raw = NOW.isoformat() + " " * 60
    assert reason_of(sdk_headers(raw_date=raw, date_header=header)) == "bad-date"


def test_missing_date_is_bad_date() -> None:
    headers = sdk_headers()
    del headers["date"]
    assert reason_of(headers) == "bad-date"


def test_empty_date_is_bad_date() -> None:
    assert reason_of(sdk_headers() | {"date": ""}) == "bad-date"


def test_auth_error_carries_reason_and_message() -> None:
    with pytest.raises(AuthError) as info:
        check({})
    assert info.value.reason == "missing"
    assert info.value.message == str(info.value)
    assert "Authorization" in info.value.message


def test_error_messages_never_echo_the_secret() -> None:
    for headers in (
        sdk_headers(secret_key=SECRET + "x"),
        sdk_headers(date=NOW - timedelta(days=1)),
    ):
        with pytest.raises(AuthError) as info:
            check(headers)
        assert SECRET not in info.value.message


@given(
    auth=st.none() | st.text(max_size=300),
    date=st.none() | st.text(max_size=80),
    x_date=st.none() | st.text(max_size=80),
    host=st.none() | st.text(max_size=40),
    content_type=st.none() | st.text(max_size=40),
)
def test_arbitrary_headers_only_ever_raise_auth_error(
    auth: str | None,
    date: str | None,
    x_date: str | None,
    host: str | None,
    content_type: str | None,
) -> None:
    raw = {
        "authorization": auth,
        "date": date,
        "x-backendai-date": x_date,
        "host": host,
        "content-type": content_type,
    }
    headers = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(AuthError) as info:
        check(headers)
    assert info.value.reason in {"missing", "malformed", "bad-date", "stale-date", "bad-signature"}


@given(raw=st.text(max_size=64))
def test_arbitrary_date_with_a_well_formed_signature_only_raises_auth_error(raw: str) -> None:
    headers = with_signature(sdk_headers(), "0" * 64) | {"date": raw}
    with pytest.raises(AuthError) as info:
        check(headers)
    assert info.value.reason in {"bad-date", "stale-date", "bad-signature"}
