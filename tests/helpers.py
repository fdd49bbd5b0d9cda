"""Shared test helpers: principals, events, signed requests and an SSE frame reader."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.config import KeypairSettings
from proxy.signing import sign_headers

EVENTS_PATH = "/stream/kernel/_/events"


@dataclass(frozen=True)
class Key:
    access_key: str
    secret_key: str
    role: str
    user_id: str
    domain: str

    def settings(self) -> KeypairSettings:
        return KeypairSettings.model_validate(
            {
                "access_key": self.access_key,
                "secret_key": self.secret_key,
                "role": self.role,
                "user_id": self.user_id,
                "domain": self.domain,
            }
        )


USER1 = Key("AKUSER1", "secret-user-1-xxxxxxxx", "user", "u1", "default")
USER1B = Key("AKUSER1B", "secret-user-1b-xxxxxxx", "user", "u1", "default")
USER2 = Key("AKUSER2", "secret-user-2-xxxxxxxx", "user", "u2", "default")
ADMIN = Key("AKADMIN", "secret-admin-xxxxxxxxx", "admin", "a1", "default")
RESEARCH_ADMIN = Key("AKRADMIN", "secret-radmin-xxxxxxxx", "admin", "a2", "research")
RESEARCH_USER = Key("AKRUSER", "secret-ruser-xxxxxxxxx", "user", "r1", "research")
SUPER = Key("AKSUPER", "secret-super-xxxxxxxxx", "superadmin", "s1", "default")
ALL_KEYS = (USER1, USER1B, USER2, ADMIN, RESEARCH_ADMIN, RESEARCH_USER, SUPER)


def lifecycle(
    name: str,
    session: str,
    owner: Key,
    *,
    group: str = "g1",
    reason: str | None = None,
    result: int = pb.RESULT_UNSPECIFIED,
    exit_code: int | None = None,
    kernel_id: str = "",
    sequence: int = 0,
    session_uuid: str = "",
    cluster_role: str = "",
    cluster_idx: int = 0,
) -> pb.LifecycleEvent:
    event = pb.LifecycleEvent(
        sequence=sequence,
        name=name,
        session_id=session,
        kernel_id=kernel_id,
        session_uuid=session_uuid,
        cluster_role=cluster_role,
        cluster_idx=cluster_idx,
        owner_access_key=owner.access_key,
        user_id=owner.user_id,
        domain_name=owner.domain,
        group_name=group,
        result=result,  # type: ignore[arg-type]
    )
    if reason is not None:
        event.reason = reason
    if exit_code is not None:
        event.exit_code = exit_code
    return event


def signed_headers(
    url: str, key: Key, *, date: datetime | None = None, method: str = "GET"
) -> dict[str, str]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return sign_headers(
        method=method,
        raw_target=target,
        host=parts.netloc,
        access_key=key.access_key,
        secret_key=key.secret_key,
        date=date or datetime.now(UTC),
    )


@dataclass
class Frame:
    """One SSE block as received: its raw bytes and parsed fields."""

    raw: bytes
    fields: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.fields if k == name]
        return values[-1] if values else None

    @property
    def event(self) -> str | None:
        return self.get("event")

    @property
    def id(self) -> str | None:
        return self.get("id")

    @property
    def data(self) -> Any:
        raw = self.get("data")
        return None if raw is None else json.loads(raw)

    @property
    def is_comment(self) -> bool:
        return all(k == "" for k, _ in self.fields)

    @property
    def is_event(self) -> bool:
        """Would a client dispatch it (it has data)?"""
        return any(k == "data" for k, _ in self.fields)


def parse_block(block: bytes) -> Frame:
    frame = Frame(raw=block + b"\n\n")
    for line in block.decode("utf-8").split("\n"):
        name, _, value = line.partition(":")
        frame.fields.append((name, value[1:] if value.startswith(" ") else value))
    return frame


class SSEReader:
    """Splits a raw response body into SSE blocks, keeping the exact bytes."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._chunks = response.aiter_raw()
        self._buffer = b""

    async def next(self, *, skip_comments: bool = True) -> Frame:
        while True:
            while b"\n\n" not in self._buffer:
                self._buffer += await self._chunks.__anext__()
            block, _, self._buffer = self._buffer.partition(b"\n\n")
            frame = parse_block(block)
            if skip_comments and frame.is_comment:
                continue
            return frame

    async def take(self, n: int, timeout: float = 10.0) -> list[Frame]:
        with trio.fail_after(timeout):
            return [await self.next() for _ in range(n)]

    async def nothing_within(self, seconds: float) -> list[Frame]:
        """Frames (other than comments) that arrive within ``seconds``; usually none."""
        got: list[Frame] = []
        with trio.move_on_after(seconds):
            while True:
                got.append(await self.next())
        return got


async def wait_for_http(client: httpx.AsyncClient, url: str, timeout: float = 15.0) -> None:
    """Wait until ``url`` answers 200 (a server process starting up)."""
    with trio.fail_after(timeout):
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def query(**params: str) -> str:
    from urllib.parse import urlencode

    return ("?" + urlencode(params, safe="*")) if params else ""


async def aiter_frames(reader: SSEReader) -> AsyncIterator[Frame]:
    while True:
        yield await reader.next()


def names(frames: Iterable[Frame]) -> list[str | None]:
    return [f.event for f in frames]
