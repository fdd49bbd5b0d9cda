"""No upstream string can forge an SSE event, end to end.

Hypothesis writes events whose every string (name, session, owner, reason, kernel,
user, domain, group) may hold CR, LF, CRLF, NUL, Unicode line and paragraph
separators, NEL, a BOM, ``\\r\\nevent: forged``, ``data:``/``id:``/``retry:`` lines and
so on, into the real gRPC upstream. A real proxy forwards them to a real socket, and an
independent WHATWG parser (``tests/test_sse.py``) reads the stream. It must yield
exactly the events sent, each string intact inside the JSON data, or, for an event
whose name is not a safe token (or is one of the proxy's own notice names), one
``stream_gap`` where it was: never an extra event, never a forged one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import count
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.signing import sign_headers

from ..helpers import EVENTS_PATH, SUPER, USER1, lifecycle
from ..live import LiveProxy, live_proxy
from ..test_sse import ParsedEvent, parse_stream

SCALE = float(os.environ.get("KEP_FUZZ_SCALE", "1"))
# The rule, restated independently: printable ASCII without spaces, 1 to 128 long, and
# not one of the proxy's notices.
SAFE_NAME = re.compile(r"[!-~]{1,128}")
RESERVED = {"stream_gap", "stream_overflow", "server_close"}
NONCE = count(1)

EVIL = [
    "\r",
    "\n",
    "\r\n",
    "\n\n",
    "\r\r",
    "\x00",
    "\u2028",
    "\u2029",
    "\x85",
    "\x0b",
    "\x0c",
    "\ufeff",
    "\r\nevent: forged\r\ndata: {}\r\n\r\n",
    "\nevent: forged\ndata: x\n\n",
    "\revent: server_close\rdata: {}\r\r",
    "\nid: evil:1\n",
    "\nretry: 1\n",
    "data: ",
    ": comment",
    ":",
    " ",
    '"',
    "\\",
    "\\n",
    "é",
    "😀",
    "\ud7ff",
    "</script>",
]
hostile = st.lists(
    st.one_of(
        st.sampled_from(EVIL),
        st.text(st.characters(exclude_categories=["Cs"]), max_size=6),
    ),
    max_size=6,
).map("".join)
names = st.one_of(
    st.sampled_from(["kernel_started", "kernel_terminated", "x-new.event/v2", "a", "!~"]),
    st.sampled_from(sorted(RESERVED)),
    st.from_regex(r"[!-~]{1,20}", fullmatch=True),
    st.just("n" * 128),
    st.just("n" * 129),
    hostile,
)


@dataclass(frozen=True)
class Sent:
    name: str
    session: str
    owner: str
    reason: str | None
    kernel: str
    user: str
    domain: str
    group: str

    def proto(self) -> pb.LifecycleEvent:
        msg = pb.LifecycleEvent(
            name=self.name,
            session_id=self.session,
            owner_access_key=self.owner,
            kernel_id=self.kernel,
            user_id=self.user,
            domain_name=self.domain,
            group_name=self.group,
        )
        if self.reason is not None:
            msg.reason = self.reason
        return msg

    @property
    def forwarded(self) -> bool:
        return SAFE_NAME.fullmatch(self.name) is not None and self.name not in RESERVED


events = st.builds(
    Sent,
    name=names,
    session=hostile,
    owner=hostile,
    reason=st.none() | hostile,
    kernel=hostile,
    user=hostile,
    domain=hostile,
    group=hostile,
)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveProxy]:
    with live_proxy() as proxy:
        # A first event, so that every new stream starts with a position block: that
        # block is the sign that the stream is subscribed. It must have been published
        # before any stream opens, or the first stream would receive it live (the hub
        # has a position as soon as it is attached, before any event).
        proxy.upstream.log.append([lifecycle("kernel_started", "seed", USER1)])
        deadline = time.monotonic() + 10
        while proxy.call(lambda: proxy.running.hub.published) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield proxy


def open_stream(live: LiveProxy) -> socket.socket:
    parts = urlsplit(live.url)
    assert parts.hostname is not None
    assert parts.port is not None
    sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
    headers = sign_headers(
        method="GET",
        raw_target=EVENTS_PATH,
        host=live.host,
        access_key=SUPER.access_key,
        secret_key=SUPER.secret_key,
        date=datetime.now(UTC),
    )
    lines = [f"GET {EVENTS_PATH} HTTP/1.1", f"Host: {live.host}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


class Stream:
    """One raw event-stream connection; ``until`` returns its whole body so far."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = b""

    def until(self, done: Callable[[bytes], bool], seconds: float = 5.0) -> bytes:
        deadline = time.monotonic() + seconds
        while True:
            head, sep, rest = self.raw.partition(b"\r\n\r\n")
            if sep:
                assert head.startswith(b"HTTP/1.1 200"), head
                body = dechunk(rest)
                if done(body):
                    return body
            assert time.monotonic() < deadline, f"timed out: {self.raw[-500:]!r}"
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"nothing more after: {self.raw[-1000:]!r}") from None
            assert chunk, "the proxy closed the stream"
            self.raw += chunk


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return out
        size = int(size_line, 16)
        if len(rest) < size + 2:
            return out
        out, data = out + rest[:size], rest[size + 2 :]


def expected_payload(e: Sent) -> dict[str, object]:
    payload: dict[str, object] = {
        "sessionId": e.session,
        "ownerAccessKey": e.owner,
        "reason": e.reason,
    }
    if e.kernel:
        payload["kernelId"] = e.kernel
    return payload


@settings(
    max_examples=max(10, int(150 * SCALE)),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(batch=st.lists(events, min_size=1, max_size=8))
def test_hostile_upstream_strings_never_forge_an_event(live: LiveProxy, batch: list[Sent]) -> None:
    nonce = f"sentinel-{next(NONCE)}"
    sock = open_stream(live)
    try:
        stream = Stream(sock)
        stream.until(lambda body: body.endswith(b"\n\n"))  # a position block: subscribed
        live.upstream.log.append(
            [e.proto() for e in batch] + [lifecycle("kernel_started", nonce, USER1)]
        )
        marker = f'"sessionId":"{nonce}"'.encode()
        body = stream.until(lambda body: marker in body and body.endswith(b"\n\n"))
    finally:
        sock.close()
    got = [e for e in parse_stream(body) if e.name != "message" or e.data]
    want: list[tuple[str, object]] = []
    gap = False
    for e in batch:
        if e.forwarded:
            if gap:
                want.append(("stream_gap", "upstream-gap"))
                gap = False
            want.append((e.name, expected_payload(e)))
        else:
            gap = True
    if gap:
        want.append(("stream_gap", "upstream-gap"))
    want.append(("kernel_started", "sentinel"))
    assert [summary(e) for e in got] == want


def summary(e: ParsedEvent) -> tuple[str, object]:
    data = json.loads(e.data)  # every dispatched event carries one JSON document
    if e.name == "stream_gap":
        assert set(data) == {"reason", "after", "before"}
        return (e.name, data["reason"])
    if str(data.get("sessionId", "")).startswith("sentinel-"):
        return (e.name, "sentinel")
    assert set(data) <= {"sessionId", "ownerAccessKey", "reason", "result", "kernelId"}
    data.pop("result", None)  # names ending in _terminated etc. carry it
    return (e.name, data)
