"""The client library and ``tail``: SSE parsing, signing, resume, backoff, exit codes."""

from __future__ import annotations

import argparse
import io
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proxy import client as client_module
from proxy import sse, tail
from proxy.client import (
    Backoff,
    ClientError,
    Credentials,
    SSEMessage,
    SSEParser,
    SSEProtocolError,
    StreamEvent,
    StreamInterrupted,
    build_target,
    stream_events,
)
from proxy.policy import Principal, Role
from proxy.signing import Keypair, verify

CREDS = Credentials("AKTEST", "secret-test")
BASE = "http://proxy.test:8080"
_PRINCIPAL = Principal("AKTEST", Role.USER, "u1", "default")


def parse_all(*chunks: bytes, last_event_id: str = "") -> list[SSEMessage]:
    parser = SSEParser(last_event_id)
    return [message for chunk in chunks for message in parser.feed(chunk)]


def frame(name: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    return sse.encode_event(name, json.dumps(data, separators=(",", ":")), event_id)


def kernel(seq: int, name: str = "kernel_started", session: str = "sess-1") -> bytes:
    data = {"sessionId": session, "ownerAccessKey": "AKTEST", "reason": None}
    return frame(name, data, f"log1:{seq}")


PING = sse.encode_comment("ping")
GAP = frame("stream_gap", {"reason": "history-exhausted", "after": "log0:9", "before": "log1:1"})
SERVER_CLOSE = frame("server_close", {"reason": "server-shutdown"})
OVERFLOW = frame("stream_overflow", {"reason": "client-too-slow", "limit": 10})


# -- SSE parsing ------------------------------------------------------------------------


def test_parses_id_event_and_data() -> None:
    (message,) = parse_all(b'id: log1:7\nevent: kernel_started\ndata: {"a":1}\n\n')
    assert message == SSEMessage("kernel_started", '{"a":1}', "log1:7", "log1:7")


def test_comments_and_heartbeats_dispatch_nothing_even_after_an_id() -> None:
    # httpx-sse 0.4.3 turns this heartbeat into an empty "message" (its issue #35).
    messages = parse_all(b": hello\n\nid: x:1\ndata: 1\n\n: ping\n\n:\n\n")
    assert [m.data for m in messages] == ["1"]


def test_multi_line_data_is_joined_with_newlines() -> None:
    (message,) = parse_all(b"data: one\ndata:two\ndata\ndata:  four\n\n")
    assert message.data == "one\ntwo\n\n four"
    assert message.event == "message"


def test_ids_are_sticky_but_an_event_without_one_reports_none() -> None:
    first, gap, second = parse_all(
        b"id: L:1\ndata: a\n\nevent: stream_gap\ndata: g\n\nid: L:2\ndata: b\n\n"
    )
    assert (first.id, first.last_event_id) == ("L:1", "L:1")
    assert (gap.id, gap.last_event_id) == (None, "L:1")
    assert (second.id, second.last_event_id) == ("L:2", "L:2")


def test_resume_position_survives_an_id_less_first_event() -> None:
    (gap,) = parse_all(b"event: stream_gap\ndata: {}\n\n", last_event_id="L:5")
    assert gap.last_event_id == "L:5"


def test_id_with_nul_is_ignored_and_empty_id_resets() -> None:
    _a, b = parse_all(b"id: L:1\ndata: a\n\nid: L:\x002\ndata: b\n\n")
    assert (b.id, b.last_event_id) == (None, "L:1")
    (c,) = parse_all(b"id\ndata: c\n\n", last_event_id="L:1")
    assert (c.id, c.last_event_id) == ("", "")


def test_a_block_without_data_is_not_an_event_but_its_id_counts() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: L:3\nevent: x\n\n") == []
    assert parser.last_event_id == "L:3"
    (message,) = parser.feed(b"data: y\n\n")
    assert (message.event, message.id, message.last_event_id) == ("message", None, "L:3")


def test_line_endings_cr_lf_and_crlf_and_a_cr_split_from_its_lf() -> None:
    expected = [SSEMessage("e", "d", None, "")] * 3
    assert parse_all(b"event: e\rdata: d\r\revent: e\ndata: d\n\nevent: e\r\ndata: d\r\n\r\n") == (
        expected
    )
    # A CR at the end of one chunk and a LF at the start of the next are one line end.
    assert parse_all(b"event: e\r", b"\ndata: d\r", b"\n\r", b"\n") == expected[:1]


def test_bom_is_stripped_only_at_the_start() -> None:
    (message,) = parse_all(b"\xef\xbb", b"\xbfdata: x\n\n")
    assert message.data == "x"
    assert parse_all(b"data: x\n\n\xef\xbb\xbfdata: y\n\n")[1:] == []


def test_unknown_fields_ignored_and_only_one_space_stripped() -> None:
    (message,) = parse_all(b"foo: bar\nevent:plain\ndata:   spaced\n\n")
    assert (message.event, message.data) == ("plain", "  spaced")


def test_retry_takes_digits_only() -> None:
    parser = SSEParser()
    parser.feed(b"retry: 2500\n\nretry: 1e3\n\nretry: -5\n\n")
    assert parser.retry == 2500


def test_an_unfinished_event_is_not_dispatched() -> None:
    assert parse_all(b"id: L:9\nevent: kernel_started\ndata: {}\n") == []


def test_multibyte_utf8_split_across_chunks_and_invalid_bytes_replaced() -> None:
    raw = "data: 세션 é\n\n".encode()
    assert parse_all(*(raw[i : i + 1] for i in range(len(raw))))[0].data == "세션 é"
    assert parse_all(b"data: \xff\n\n")[0].data == "\ufffd"


def test_an_endless_line_is_refused() -> None:
    parser = SSEParser(max_event_size=100)
    parser.feed(b"data: " + b"x" * 50)
    with pytest.raises(SSEProtocolError):
        parser.feed(b"x" * 60)
    with pytest.raises(SSEProtocolError):
        SSEParser(max_event_size=100).feed(b"data: x\n" * 60)


_field_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x00"), max_size=20
)
_event = st.tuples(
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    st.lists(_field_text, min_size=1, max_size=3).map("\n".join),
    st.none() | st.from_regex(r"[a-z0-9]{1,6}:[0-9]{1,5}", fullmatch=True),
)


@given(
    events=st.lists(st.tuples(_event, st.booleans()), max_size=8),
    eol=st.sampled_from(["\n", "\r", "\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_any_chunking_gives_the_events_the_server_encoded(
    events: list[tuple[tuple[str, str, str | None], bool]], eol: str, cuts: list[int]
) -> None:
    stream = b""
    expected: list[SSEMessage] = []
    last = ""
    for (name, data, event_id), ping in events:
        if ping:
            stream += sse.encode_comment("ping")
        stream += sse.encode_event(name, data, event_id)
        last = event_id if event_id is not None else last
        expected.append(SSEMessage(name, data, event_id, last))
    stream = stream.replace(b"\n", eol.encode())
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    assert parse_all(*chunks) == expected


# -- pieces of the client ---------------------------------------------------------------


def test_stream_event_properties() -> None:
    event = StreamEvent(
        "kernel_terminated",
        {
            "sessionId": "s",
            "ownerAccessKey": "AK",
            "reason": "done",
            "result": "SUCCESS",
            "kernelId": "k",
            "exitCode": 0,
        },
        "L:1",
    )
    assert (event.session_id, event.owner_access_key, event.reason, event.result) == (
        "s",
        "AK",
        "done",
        "SUCCESS",
    )
    assert (event.kernel_id, event.exit_code, event.is_gap, event.gap_after) == (
        "k",
        0,
        False,
        None,
    )
    gap = StreamEvent("stream_gap", {"reason": "r", "after": None, "before": "L:2"}, None)
    assert (gap.is_gap, gap.reason, gap.gap_after, gap.gap_before) == (True, "r", None, "L:2")
    assert StreamEvent("x", {"exitCode": True, "reason": 3}, None).exit_code is None
    assert StreamEvent("x", {"reason": 3}, None).reason is None


def test_secret_key_is_not_in_repr() -> None:
    assert "secret-test" not in repr(CREDS)


def test_build_target_keeps_star_raw_and_appends_the_stream_path() -> None:
    target = build_target("http://h:80/prefix/", session="*", owner="AK x/é", group="a+b")
    assert target.host == "h:80"
    assert target.raw_target == (
        "/prefix/stream/kernel/_/events?sessionId=*&ownerAccessKey=AK+x%2F%C3%A9&group=a%2Bb"
    )
    assert httpx.URL(target.url).raw_path.decode() == target.raw_target
    assert build_target(BASE + "/stream/kernel/_/events").raw_target == "/stream/kernel/_/events"
    assert build_target("https://[::1]:9/").host == "[::1]:9"


def test_build_target_for_v5_and_initial_state() -> None:
    target = build_target(BASE, session="s", owner="AK", session_uuid="u-1", scope="kernel",
                          api="v5", initial_state=True)  # fmt: skip
    assert target.raw_target == (
        "/events/session?sessionName=s&ownerAccessKey=AK&sessionId=u-1&scope=kernel"
        "&initialState=true"
    )
    assert build_target(BASE, initial_state=True).raw_target == (
        "/stream/kernel/_/events?initialState=true"
    )
    with pytest.raises(ValueError, match="api='v5'"):
        build_target(BASE, session_uuid="u-1")


@pytest.mark.parametrize(
    "url", ["ftp://h/", "http:///x", "h:8080", "http://u:p@h/", "http://h/?a=1", "http://h/#f"]
)
def test_build_target_refuses_urls_it_cannot_sign_faithfully(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        build_target(url)


def test_backoff_doubles_caps_and_resets() -> None:
    backoff = Backoff(1.0, 5.0, rng=lambda: 1.0)
    assert [backoff.next() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == 1.0
    backoff.reset(0.25)
    assert backoff.next() == 0.25
    low = Backoff(4.0, 4.0, rng=lambda: 0.0)
    assert low.next() == 2.0  # jitter takes at most half off
    with pytest.raises(ValueError, match="retry_delay"):
        Backoff(2.0, 1.0)


# -- stream_events against a scripted fake server --------------------------------------

Script = Callable[[httpx.Request], Awaitable[httpx.Response]]


@dataclass
class Seen:
    request: httpx.Request
    at: float


class FakeServer:
    """Answers each connection with the next script; an unexpected one fails the test."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.seen: list[Seen] = []
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(Seen(request, trio.current_time()))
        if not self.scripts:
            raise AssertionError(f"unexpected connection #{len(self.seen)}")
        return await self.scripts.pop(0)(request)

    def last_event_ids(self) -> list[str | None]:
        return [s.request.headers.get("last-event-id") for s in self.seen]


def stream(*chunks: bytes, error: Exception | None = None, content_type: str = "") -> Script:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            await trio.lowlevel.checkpoint()
            yield chunk
        if error is not None:
            raise error

    async def script(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"content-type": content_type or "text/event-stream; charset=utf-8"},
            content=body(),
        )

    return script


def answer(status: int, body: dict[str, Any] | str) -> Script:
    async def script(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    return script


def refuse(exc_type: type[httpx.TransportError] = httpx.ConnectError) -> Script:
    async def script(request: httpx.Request) -> httpx.Response:
        raise exc_type("connection refused", request=request)

    return script


async def take(server: FakeServer, n: int | None, **kwargs: Any) -> list[StreamEvent]:
    """The first ``n`` events (all, if None), then close the stream."""
    kwargs.setdefault("retry_delay", 0.0)
    out: list[StreamEvent] = []
    with trio.fail_after(3600):  # virtual time under autojump_clock; a hang fails
        async with aclosing(stream_events(BASE, CREDS, http_client=server.client, **kwargs)) as it:
            async for event in it:
                out.append(event)
                if n is not None and len(out) >= n:
                    break
    return out


def _lookup(access_key: str) -> Keypair | None:
    return Keypair("AKTEST", "secret-test", _PRINCIPAL) if access_key == "AKTEST" else None


async def test_requests_are_signed_over_the_raw_target_and_host() -> None:
    server = FakeServer(stream(kernel(1)))
    await take(server, 1, session="sess-*", owner="AKTEST", group="g 1")
    request = server.seen[0].request
    assert (
        request.url.raw_path
        == b"/stream/kernel/_/events?sessionId=sess-*&ownerAccessKey=AKTEST&group=g+1"
    )
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["host"] == "proxy.test:8080"
    assert headers["accept"] == "text/event-stream"
    assert "content-type" not in headers
    assert "last-event-id" not in headers
    principal = verify(
        method="GET",
        raw_target=request.url.raw_path.decode(),
        headers=headers,
        lookup=_lookup,
        now=datetime.now(UTC),
    )
    assert principal == _PRINCIPAL


async def test_each_connection_is_signed_afresh(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    times = iter(datetime(2026, 11, 28, 10, 0, tzinfo=UTC) + timedelta(minutes=i) for i in range(9))
    monkeypatch.setattr(client_module, "_utcnow", lambda: next(times))
    server = FakeServer(stream(kernel(1)), stream(kernel(2)))
    await take(server, 2)
    dates = [s.request.headers["date"] for s in server.seen]
    assert dates == ["2026-11-28T10:00:00+00:00", "2026-11-28T10:01:00+00:00"]
    for seen in server.seen:
        verify(
            method="GET",
            raw_target=seen.request.url.raw_path.decode(),
            headers={k.lower(): v for k, v in seen.request.headers.items()},
            lookup=_lookup,
            now=datetime(2026, 11, 28, 10, 1, tzinfo=UTC),
        )


async def test_resumes_after_stream_end_with_the_last_yielded_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(
        stream(PING, kernel(1), PING, kernel(2)[:10]),  # the 2nd event is cut off
        stream(kernel(2), GAP, PING, kernel(3)),
        stream(kernel(4)),
    )
    events = await take(server, 5)
    assert [e.name for e in events] == [
        "kernel_started",
        "kernel_started",
        "stream_gap",
        "kernel_started",
        "kernel_started",
    ]
    assert [e.id for e in events] == ["log1:1", "log1:2", None, "log1:3", "log1:4"]
    assert events[2].is_gap
    assert events[2].gap_after == "log0:9"
    assert server.last_event_ids() == [None, "log1:1", "log1:3"]


async def test_initial_last_event_id_is_kept_until_an_event_replaces_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(stream(GAP), stream(PING), stream(kernel(8)))
    events = await take(server, 2, last_event_id="log1:5")
    assert [e.name for e in events] == ["stream_gap", "kernel_started"]
    assert server.last_event_ids() == ["log1:5", "log1:5", "log1:5"]


async def test_overflow_and_server_close_reconnect_and_are_not_yielded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(
        stream(kernel(1), OVERFLOW, kernel(99)),  # nothing after the notice counts
        stream(kernel(2), SERVER_CLOSE),
        stream(kernel(3)),
    )
    events = await take(server, 3)
    assert [e.id for e in events] == ["log1:1", "log1:2", "log1:3"]
    assert server.last_event_ids() == [None, "log1:1", "log1:2"]


async def test_server_close_ends_the_iteration_without_reconnect() -> None:
    server = FakeServer(stream(kernel(1), SERVER_CLOSE))
    events = await take(server, None, reconnect=False)
    assert [e.id for e in events] == ["log1:1"]
    assert len(server.seen) == 1


async def test_without_reconnect_other_ends_raise_with_the_resume_position() -> None:
    server = FakeServer(stream(kernel(1), kernel(2)))
    with pytest.raises(StreamInterrupted) as info:
        await take(server, None, reconnect=False)
    assert info.value.last_event_id == "log1:2"

    server = FakeServer(stream(kernel(1), error=httpx.ReadError("reset")))
    with pytest.raises(StreamInterrupted) as info:
        await take(server, None, reconnect=False, last_event_id="log1:0")
    assert info.value.last_event_id == "log1:1"
    assert isinstance(info.value.__cause__, httpx.ReadError)

    server = FakeServer(stream(OVERFLOW))
    with pytest.raises(StreamInterrupted, match="too slow"):
        await take(server, None, reconnect=False)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_client_errors_are_raised_at_once_with_the_body(status: int) -> None:
    server = FakeServer(
        answer(status, {"status": status, "error": "bad-signature", "title": "T", "detail": "D"})
    )
    with pytest.raises(ClientError) as info:
        await take(server, None)
    assert (info.value.status, info.value.error, info.value.title, info.value.detail) == (
        status,
        "bad-signature",
        "T",
        "D",
    )
    assert not info.value.retryable
    assert len(server.seen) == 1


async def test_an_error_body_that_is_not_json_still_explains() -> None:
    server = FakeServer(answer(401, "<html>\n  nope  </html>"))
    with pytest.raises(ClientError) as info:
        await take(server, None)
    assert (info.value.error, info.value.detail) == ("Unauthorized", "<html> nope </html>")


async def test_a_response_that_is_not_an_event_stream_is_refused() -> None:
    server = FakeServer(stream(b"<html>", content_type="text/html"))
    with pytest.raises(ClientError, match="not-an-event-stream"):
        await take(server, None)


async def test_network_errors_and_5xx_back_off_and_a_connection_resets_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(
        refuse(),
        answer(503, {"status": 503, "error": "unavailable"}),
        refuse(httpx.ConnectTimeout),
        stream(kernel(1)),  # connected: the next delay starts over
        refuse(),
        stream(kernel(2)),
    )
    events = await take(server, 2, retry_delay=1.0, max_retry_delay=3.0)
    assert [e.id for e in events] == ["log1:1", "log1:2"]
    gaps = [b.at - a.at for a, b in zip(server.seen, server.seen[1:], strict=False)]
    # Jitter: each delay is within [d/2, d] for d = 1, 2, 3 (capped), then 1, 2.
    for gap, nominal in zip(gaps, [1.0, 2.0, 3.0, 1.0, 2.0], strict=True):
        assert nominal / 2 <= gap <= nominal
    assert server.last_event_ids() == [None, None, None, None, "log1:1", "log1:1"]


async def test_5xx_without_reconnect_raises() -> None:
    server = FakeServer(answer(502, {"status": 502, "error": "bad-gateway"}))
    with pytest.raises(ClientError) as info:
        await take(server, None, reconnect=False)
    assert info.value.retryable


async def test_the_servers_retry_field_is_milliseconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(stream(b"retry: 4000\n\n", kernel(1)), stream(kernel(2)))
    await take(server, 2, retry_delay=1.0, max_retry_delay=30.0)
    assert 2.0 <= server.seen[1].at - server.seen[0].at <= 4.0


async def test_data_that_is_not_a_json_object_is_skipped() -> None:
    server = FakeServer(stream(b"id: log1:1\ndata: [1]\n\n", kernel(2)))
    events = await take(server, 1)
    assert [e.id for e in events] == ["log1:2"]


def begin(reason: str = "initial") -> bytes:
    return frame("stream_state_begin", {"reason": reason})


def state_event(session: str, name: str = "kernel_started") -> bytes:
    return frame(name, {"sessionId": session, "ownerAccessKey": "AKTEST", "reason": None})


def end(seq: int, entities: int) -> bytes:
    return frame("stream_state_end", {"entities": entities}, f"log1:{seq}")


async def test_initial_state_marks_the_state_and_where_it_ends() -> None:
    server = FakeServer(stream(begin(), state_event("a"), state_event("b"), end(5, 2), kernel(6)))
    events = await take(server, 5, initial_state=True)
    assert b"initialState=true" in server.seen[0].request.url.raw_path
    first, a, b, last, live = events
    assert (first.is_state_begin, first.is_resync, first.from_state) == (True, False, False)
    assert [(e.session_name, e.from_state, e.id) for e in (a, b)] == [
        ("a", True, None),
        ("b", True, None),
    ]
    assert (last.is_state_end, last.entities, last.id, last.from_state) == (
        True,
        2,
        "log1:5",
        False,
    )
    assert (live.from_state, live.id, live.is_state_begin, live.entities) == (
        False,
        "log1:6",
        False,
        None,
    )


async def test_a_state_cut_short_asks_for_a_fresh_one_a_finished_one_resumes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(
        stream(kernel(3), begin("resync"), state_event("a")),  # cut off inside a resync
        stream(begin(), state_event("a"), end(7, 1)),  # then cut off after its end
        stream(kernel(8)),
    )
    events = await take(server, 7, initial_state=True)
    assert [(e.name, e.is_resync, e.from_state) for e in events] == [
        ("kernel_started", False, False),
        ("stream_state_begin", True, False),
        ("kernel_started", False, True),
        ("stream_state_begin", False, False),
        ("kernel_started", False, True),
        ("stream_state_end", False, False),
        ("kernel_started", False, False),
    ]
    # Not log1:3: the state begun after it told the caller to drop its view.
    assert server.last_event_ids() == [None, None, "log1:7"]


async def test_an_interrupted_state_says_to_start_over() -> None:
    server = FakeServer(stream(kernel(3), begin("resync"), state_event("a")))
    with pytest.raises(StreamInterrupted) as info:
        await take(server, None, reconnect=False, initial_state=True)
    assert info.value.last_event_id is None
    server = FakeServer(stream(begin(), end(4, 0)))
    with pytest.raises(StreamInterrupted) as info:
        await take(server, None, reconnect=False, initial_state=True)
    assert info.value.last_event_id == "log1:4"


def test_session_name_on_either_path() -> None:
    v5 = StreamEvent("session_started", {"sessionName": "n", "sessionId": "uuid-1"}, "L:1")
    assert (v5.session_name, v5.session_id) == ("n", "uuid-1")
    v4 = StreamEvent("session_started", {"sessionId": "n"}, "L:1")
    assert (v4.session_name, v4.session_id) == ("n", "n")
    assert StreamEvent("stream_state_end", {"entities": True}, "L:1").entities is None


# -- tail --------------------------------------------------------------------------------


def tail_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kernel-events-proxy")
    tail.add_parser(parser.add_subparsers())
    return parser.parse_args(["tail", "--url", BASE, *argv])


async def run_tail(server: FakeServer, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = tail_args("--access-key", "AKTEST", "--secret-key", "secret-test", *argv)
    with trio.fail_after(3600):
        code = await tail.follow(args, out, err, http_client=server.client)
    return code, out.getvalue(), err.getvalue()


def test_tail_defaults_come_from_the_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEP_URL", "http://elsewhere:1")
    monkeypatch.setenv("BACKEND_ACCESS_KEY", "AKENV")
    monkeypatch.setenv("BACKEND_SECRET_KEY", "SKENV")
    parser = argparse.ArgumentParser()
    tail.add_parser(parser.add_subparsers())
    args = parser.parse_args(["tail"])
    assert (args.url, args.access_key, args.secret_key) == ("http://elsewhere:1", "AKENV", "SKENV")
    assert args.func is tail.run
    assert "SKENV" not in parser.format_help()


async def test_tail_json_lines_stop_after_count() -> None:
    server = FakeServer(stream(kernel(1), GAP, kernel(2)))
    code, out, _err = await run_tail(server, "--json", "--count", "2", "--session", "sess-1")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [
        {
            "id": "log1:1",
            "event": "kernel_started",
            "data": {"sessionId": "sess-1", "ownerAccessKey": "AKTEST", "reason": None},
        },
        {
            "id": None,
            "event": "stream_gap",
            "data": {"reason": "history-exhausted", "after": "log0:9", "before": "log1:1"},
        },
    ]
    assert b"sessionId=sess-1" in server.seen[0].request.url.raw_path


async def test_tail_human_lines_escape_control_characters() -> None:
    hostile = frame(
        "kernel_terminated",
        {
            "sessionId": "s\x1b[2J",
            "ownerAccessKey": "AK1",
            "reason": "oom",
            "result": "FAILURE",
            "exitCode": 137,
        },
        "log1:1",
    )
    code, out, _ = await run_tail(FakeServer(stream(hostile, GAP)), "--count", "2")
    assert code == 0
    first, second = out.splitlines()
    assert first[19:] == (
        " kernel_terminated    s\\x1b[2J  owner=AK1  reason=oom  result=FAILURE  exit=137"
    )
    datetime.strptime(first[:19], "%Y-%m-%dT%H:%M:%S")
    assert "events may be missing: reason=history-exhausted" in second


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_tail_exits_2_with_one_line_on_refusal(status: int) -> None:
    body = {"status": status, "error": "nope", "title": "T", "detail": "the detail"}
    code, out, err = await run_tail(FakeServer(answer(status, body)))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "the detail" in err
    assert f"HTTP {status}" in err


async def test_tail_exits_1_on_other_refusals() -> None:
    code, _, err = await run_tail(FakeServer(answer(404, {"status": 404, "error": "not-found"})))
    assert code == 1
    assert "HTTP 404" in err


async def test_tail_without_credentials_names_the_flags_and_variables() -> None:
    args = tail_args()
    args.access_key = args.secret_key = None
    err = io.StringIO()
    assert await tail.follow(args, io.StringIO(), err) == 2
    assert "--access-key" in err.getvalue()
    assert "BACKEND_SECRET_KEY" in err.getvalue()


def test_tail_count_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        tail_args("--count", "0")
    assert "must be a whole number above 0" in capsys.readouterr().err


def test_tail_run_maps_ctrl_c_to_130(monkeypatch: pytest.MonkeyPatch) -> None:
    async def interrupted(*_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(tail, "follow", interrupted)
    monkeypatch.setattr(tail, "_quiet_client_logging", lambda *_: None)
    assert tail.run(tail_args()) == 130


def test_the_client_also_runs_under_asyncio() -> None:
    import asyncio

    async def handler(request: httpx.Request) -> httpx.Response:
        body = kernel(1) + kernel(2) + b'event: server_close\ndata: {"reason": "x"}\n\n'
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    async def main() -> list[str | None]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            events = stream_events(BASE, CREDS, http_client=client, reconnect=False)
            return [event.id async for event in events]

    assert asyncio.run(main()) == ["log1:1", "log1:2"]
