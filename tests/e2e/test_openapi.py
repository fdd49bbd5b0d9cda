"""/openapi.json: a valid OpenAPI 3.1 document that matches the real responses."""

from __future__ import annotations

import re
from typing import Any

import httpx
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from proxy.app import create_app
from proxy.hub import Hub
from proxy.metrics import Metrics
from proxy.openapi import DOCUMENT
from proxy.upstream import UpstreamBridge
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest, make_settings
from ..helpers import SUPER, USER1, Key, signed_headers, wait_until


def check(response: httpx.Response, path: str, method: str = "get") -> None:
    """The response's status and body are what the document says for this operation."""
    operation = DOCUMENT["paths"][path][method]
    documented = operation["responses"].get(str(response.status_code))
    assert documented, f"{method.upper()} {path} -> {response.status_code} is not documented"
    media = response.headers["content-type"].split(";")[0].strip()
    assert media in documented["content"], (media, list(documented["content"]))
    if media == "application/json":
        resource = Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
        registry: Registry[Any] = Registry().with_resource("urn:api", resource)
        # The schema where it is in the document, so that its own $refs resolve there.
        steps = ["paths", path, method, "responses", str(response.status_code), "content"]
        pointer = "/".join(p.replace("~", "~0").replace("/", "~1") for p in [*steps, media])
        schema = {"$ref": f"urn:api#/{pointer}/schema"}
        Draft202012Validator(schema, registry=registry).validate(response.json())


def test_document_is_valid_openapi_3_1() -> None:
    validate(DOCUMENT)


async def test_served_document_is_this_one(proxy: ProxyUnderTest) -> None:
    response = await proxy.client.get(f"{proxy.url}/openapi.json")
    assert response.json() == DOCUMENT
    check(response, "/openapi.json")


def test_every_route_is_documented() -> None:
    settings = make_settings("127.0.0.1:1")
    hub = Hub(history_size=1, outbox_limit=1)
    bridge = UpstreamBridge(settings.upstream, hub)
    app = create_app(settings, hub, bridge, Metrics(hub, bridge))
    routes = {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
    }
    assert routes - set(DOCUMENT["paths"]) == set(), "routes missing from the document"
    assert set(DOCUMENT["paths"]) - routes == set(), "documented paths with no route"


async def test_real_responses_match_the_document(
    proxy: ProxyUnderTest, upstream: UpstreamServer
) -> None:
    client, url = proxy.client, proxy.url
    check(await client.get(f"{url}/", headers={"Accept": "application/json"}), "/")
    check(await client.get(f"{url}/healthz"), "/healthz")
    check(await client.get(f"{url}/readyz"), "/readyz")
    check(await client.get(f"{url}/metrics"), "/metrics")
    for events, name in (("/stream/kernel/_/events", "sessionId"), ("/events/session", "name")):
        check(await proxy.get(None, path=events), events)  # 401
        stranger = Key("AKX", "unknown-secret-value", "user", "u", "d")
        check(await proxy.get(stranger, path=events), events)
        other: dict[str, str] = {name: "s", "ownerAccessKey": "AKUSER2"}
        check(await proxy.get(USER1, None, path=events, **other), events)  # 403
        check(await proxy.get(USER1, path=events, bogus="1"), events)  # 400
        check(await proxy.get(SUPER, {"Last-Event-ID": "nope"}, path=events), events)  # 400
        async with proxy.client.stream(
            "GET", f"{url}{events}", headers=signed_headers(f"{url}{events}", SUPER)
        ) as response:
            check(response, events)
    upstream.stop(0)
    await wait_until(lambda: not proxy.running.bridge.live)
    check(await client.get(f"{url}/readyz"), "/readyz")  # 503
