# The project's mypy runs without the SDK installed; to type-check this file for real:
# .venv/bin/mypy --strict --python-executable .venv-sdk/bin/python tests/sdk_client.py
"""Listen to kernel lifecycle events through the official Backend.AI client SDK.

Runs under the SDK's own virtualenv (`make sdk-env`: backend.ai-client==23.9.10 with
yarl==1.9.4), never under the project's: it imports nothing from this project.

    .venv-sdk/bin/python tests/sdk_client.py --endpoint http://127.0.0.1:PORT \
        --access-key AK --secret-key SK (--session NAME_OR_STAR | --session-uuid UUID) \
        [--owner-access-key AK2] [--group G] [--scope *|session|kernel] --count N \
        --timeout SECONDS [--expect-error] [--expect-api-version vN.YYYYMMDD]

It does what a user of the SDK does: `AsyncSession` (which first negotiates the API
version with `GET /`), then `ComputeSession(name, owner_access_key).listen_events()`
(or `ComputeSession.from_session_id(uuid)`, and `listen_events(scope=...)`): the SDK
picks `/stream/kernel/_/events` for a v4 server and `/events/session` for v6 and later.
That SDK call has no group parameter, so with `--group` the same request is built
with the SDK's public `Request(...).connect_events()`, adding `group=G`.

stdout: one JSON line per event, `{"event": name, "data": JSON-decoded data (the raw
string if it is not JSON), "id": id or null}`.
Exit status:
  0  N events received; with --expect-error: the server rejected the request, and
     `{"error": status, "body": body}` was printed
  1  --expect-error, but the server did not reject the request
  2  timeout (stderr says how many events had arrived)
  3  SDK error (HTTP status and body, connection failure, stream error), or the SDK
     negotiated another API version than --expect-api-version
  4  the stream ended (the server sent `server_close`) before N events
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
import warnings
from typing import Any

import aiohttp
from ai.backend.client.config import APIConfig
from ai.backend.client.exceptions import (
    APIVersionWarning,
    BackendAPIError,
    BackendClientError,
)
from ai.backend.client.request import Request, SSEContextManager
from ai.backend.client.session import AsyncSession

EVENTS_PATH = "/stream/kernel/_/events"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--access-key", required=True, help="'' sends unsigned requests")
    p.add_argument("--secret-key", required=True)
    p.add_argument("--session", default=None, help="session name, or '*'")
    p.add_argument(
        "--session-uuid", default=None, help="a session UUID (ComputeSession.from_session_id)"
    )
    p.add_argument("--scope", default=None, help="listen_events(scope=...): *, session, kernel")
    p.add_argument("--owner-access-key", default=None)
    p.add_argument("--group", default=None)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--expect-error", action="store_true")
    p.add_argument(
        "--expect-api-version",
        default="v4.20190615",
        help="fail if the SDK negotiated another version ('' to accept any)",
    )
    return p.parse_args()


def open_stream(sess: AsyncSession, args: argparse.Namespace) -> SSEContextManager:
    if args.session_uuid is not None:
        session = sess.ComputeSession.from_session_id(uuid.UUID(args.session_uuid))
    else:
        session = sess.ComputeSession(args.session, args.owner_access_key)
    if args.group is None:
        if args.scope is None:
            return session.listen_events()
        return session.listen_events(scope=args.scope)
    # The SDK's own call has no group parameter: the same request, plus group=G, on the
    # path the SDK picks for the negotiated version.
    if sess.api_version[0] >= 6:
        params = {**session.get_session_identity_params(), "scope": args.scope or "*"}
        path = "/events/session"
    else:
        params = {"sessionId": args.session}
        if args.owner_access_key:
            params["owner_access_key"] = args.owner_access_key
        path = EVENTS_PATH
    params["group"] = args.group
    return Request("GET", path, params=params).connect_events()


def decode(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def listen(args: argparse.Namespace, received: list[str]) -> int:
    config = APIConfig(
        endpoint=args.endpoint,
        endpoint_type="api",
        access_key=args.access_key,
        secret_key=args.secret_key,
    )
    async with AsyncSession(config=config) as sess:
        version = f"v{sess.api_version[0]}.{sess.api_version[1]}"
        if args.expect_api_version and version != args.expect_api_version:
            print(f"SDK negotiated API version {version}", file=sys.stderr)
            return 3
        async with open_stream(sess, args) as response:
            if args.expect_error:
                print(f"not rejected: HTTP {response.status}", file=sys.stderr)
                return 1
            async for msg in response:
                emit({"event": msg.event, "data": decode(msg.data), "id": msg.id})
                received.append(msg.event)
                if len(received) >= args.count:
                    return 0
    print(f"stream ended after {len(received)} of {args.count} events", file=sys.stderr)
    return 4


async def main() -> int:
    args = parse_args()
    warnings.simplefilter("ignore", APIVersionWarning)  # "server too old" for v4
    received: list[str] = []
    try:
        async with asyncio.timeout(args.timeout):
            return await listen(args, received)
    except TimeoutError:
        print(
            f"timeout after {args.timeout}s: {len(received)} of {args.count} events",
            file=sys.stderr,
        )
        return 2
    except BackendAPIError as e:
        if args.expect_error:
            emit({"error": e.status, "body": e.data})
            return 0
        print(f"HTTP {e.status} {e.reason}: {json.dumps(e.data)}", file=sys.stderr)
        return 3
    except (BackendClientError, aiohttp.ClientError) as e:
        print(f"SDK error: {e!r}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
