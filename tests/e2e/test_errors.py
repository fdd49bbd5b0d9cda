"""Bad requests get a clear status and a JSON body naming the problem."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ..conftest import ProxyUnderTest
from ..helpers import EVENTS_PATH, SUPER, USER1, Key, signed_headers

GHOST = Key("AKGHOST", "whatever-secret-xx", "superadmin", "g", "default")


async def assert_error(response: object, status: int, error: str, fragment: str = "") -> None:
    import httpx

    assert isinstance(response, httpx.Response)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == status
    assert body["error"] == error
    assert fragment in body["detail"]


async def test_unsigned_request_is_401(proxy: ProxyUnderTest) -> None:
    await assert_error(await proxy.get(None), 401, "missing", "Authorization")


async def test_unknown_key_is_401(proxy: ProxyUnderTest) -> None:
    await assert_error(await proxy.get(GHOST), 401, "bad-signature")


async def test_wrong_secret_is_401(proxy: ProxyUnderTest) -> None:
    forged = Key(SUPER.access_key, "not-the-right-secret", "superadmin", "s1", "default")
    await assert_error(await proxy.get(forged), 401, "bad-signature")


async def test_altered_query_is_401(proxy: ProxyUnderTest) -> None:
    signed_for = f"{proxy.url}{EVENTS_PATH}?sessionId=mine"
    response = await proxy.client.get(
        f"{proxy.url}{EVENTS_PATH}?sessionId=*", headers=signed_headers(signed_for, USER1)
    )
    await assert_error(response, 401, "bad-signature")


@pytest.mark.parametrize("skew", [timedelta(minutes=16), -timedelta(minutes=16)])
async def test_stale_date_is_401(proxy: ProxyUnderTest, skew: timedelta) -> None:
    url = f"{proxy.url}{EVENTS_PATH}"
    headers = signed_headers(url, SUPER, date=datetime.now(UTC) + skew)
    await assert_error(await proxy.client.get(url, headers=headers), 401, "stale-date")


async def test_malformed_authorization_is_401(proxy: ProxyUnderTest) -> None:
    response = await proxy.get(None, headers={"Authorization": "Bearer abc"})
    await assert_error(response, 401, "malformed")


async def test_user_naming_another_owner_is_403(proxy: ProxyUnderTest) -> None:
    response = await proxy.get(USER1, sessionId="s1", ownerAccessKey="AKUSER2")
    await assert_error(response, 403, "forbidden", "another owner")


async def test_unknown_parameter_is_400(proxy: ProxyUnderTest) -> None:
    response = await proxy.get(USER1, sesionId="s1")
    await assert_error(response, 400, "bad-parameter", "sesionId")


async def test_empty_parameter_is_400(proxy: ProxyUnderTest) -> None:
    response = await proxy.get(USER1, group="")
    await assert_error(response, 400, "bad-parameter", "'group' is empty")


async def test_malformed_last_event_id_is_400(proxy: ProxyUnderTest) -> None:
    response = await proxy.get(SUPER, headers={"Last-Event-ID": "garbage"})
    await assert_error(response, 400, "bad-last-event-id", "garbage")
    response = await proxy.get(SUPER, lastEventId="12")
    await assert_error(response, 400, "bad-last-event-id")


async def test_non_utf8_query_is_400(proxy: ProxyUnderTest) -> None:
    url = f"{proxy.url}{EVENTS_PATH}?group=%FF"
    response = await proxy.client.get(url, headers=signed_headers(url, SUPER))
    await assert_error(response, 400, "bad-query", "UTF-8")


async def test_duplicate_authorization_header_is_400(proxy: ProxyUnderTest) -> None:
    url = f"{proxy.url}{EVENTS_PATH}"
    headers = signed_headers(url, SUPER)
    response = await proxy.client.get(
        url,
        headers=[*headers.items(), ("Authorization", headers["Authorization"])],
    )
    await assert_error(response, 400, "duplicate-header")
