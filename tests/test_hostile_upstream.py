"""A compromised or broken upstream: every bad message is counted and skipped, or
passed safely, with a ``stream_gap`` where something is missing; the stream lives on.

Bad UTF-8 and undecodable batches: ``test_upstream.py`` (``decode_response``). Names
that would forge framing: ``e2e/test_sse_injection.py``. Here: reserved names, events
too large to keep, messages too large to receive, unknown enum values, missing fields.
"""

from __future__ import annotations

import json

import pytest
import trio

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.config import UpstreamSettings
from proxy.events import MAX_EVENT_BYTES, RESERVED_NAMES, MalformedEvent, from_proto
from proxy.hub import GAP_EVENT, OVERFLOW_EVENT, SERVER_CLOSE_EVENT, Hub
from proxy.policy import Filters, Principal, Role
from proxy.upstream import UpstreamBridge
from proxy.upstream_server import MAX_BATCH_BYTES, EventLog, UpstreamServer, _by_size

from .helpers import USER1, lifecycle, wait_until

SUPER = Principal("AKS", Role.SUPERADMIN, "s", "default")


def test_the_proxys_notice_names_are_reserved() -> None:
    assert {GAP_EVENT, OVERFLOW_EVENT, SERVER_CLOSE_EVENT} == RESERVED_NAMES
    for name in sorted(RESERVED_NAMES):
        with pytest.raises(MalformedEvent, match="invalid name"):
            from_proto(lifecycle(name, "s", USER1, sequence=1))


def test_an_event_too_large_to_keep_is_malformed() -> None:
    ok = lifecycle("kernel_started", "s", USER1, sequence=1, reason="r" * (MAX_EVENT_BYTES - 200))
    assert from_proto(ok).reason == ok.reason
    big = lifecycle("kernel_started", "s", USER1, sequence=2, reason="r" * MAX_EVENT_BYTES)
    with pytest.raises(MalformedEvent, match="larger than"):
        from_proto(big)


def test_unknown_enum_values_and_missing_fields_pass_safely() -> None:
    msg = pb.LifecycleEvent(sequence=3, name="kernel_terminated")
    msg.result = 99  # type: ignore[assignment]  # a value this build does not know
    event = from_proto(msg)
    assert event.result is None
    # Every identifying field empty: passed through as empty strings, visible only to
    # a superadmin (no user or domain matches ""), and the payload stays well formed.
    assert json.loads(event.client_json()) == {
        "sessionId": "",
        "ownerAccessKey": "",
        "reason": None,
        "result": "UNDEFINED",
    }


def test_the_shipped_upstream_sends_a_large_event_in_a_message_of_its_own() -> None:
    small = [lifecycle("kernel_started", f"s{i}", USER1, sequence=i + 1) for i in range(3)]
    huge = lifecycle("kernel_started", "big", USER1, sequence=4, reason="x" * MAX_BATCH_BYTES)
    after = lifecycle("kernel_started", "s5", USER1, sequence=5)
    batches = list(_by_size([*small, huge, after]))
    assert [[e.sequence for e in b] for b in batches] == [[1, 2, 3], [4], [5]]
    many = [lifecycle("k", "s" * 1000, USER1, sequence=i + 1) for i in range(3000)]
    assert all(sum(e.ByteSize() for e in b) <= MAX_BATCH_BYTES for b in _by_size(many))
    assert sum(len(b) for b in _by_size(many)) == 3000


async def test_a_message_too_large_to_receive_is_stepped_over_with_a_gap() -> None:
    """Before: RESOURCE_EXHAUSTED, reconnect after the same sequence, the same message,
    RESOURCE_EXHAUSTED... the stream was dead for good. Now one gap, and on it goes."""
    server = UpstreamServer(EventLog(capacity=100), "127.0.0.1:0")
    server.start()
    hub = Hub(history_size=100, outbox_limit=100)
    limit = 2 * 1024 * 1024
    bridge = UpstreamBridge(
        UpstreamSettings(
            target=server.target,
            reconnect_min=0.05,
            reconnect_max=0.3,
            max_message_bytes=limit,
        ),
        hub,
    )
    try:
        with hub.subscribe(SUPER, Filters()) as sub:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge.run)
                await wait_until(lambda: bridge.live)
                server.log.append(
                    [
                        lifecycle("kernel_started", "before", USER1),
                        # Too large for the message limit: gRPC refuses the message.
                        lifecycle("kernel_started", "huge", USER1, reason="x" * (limit + 1)),
                        lifecycle("kernel_started", "after", USER1),
                        # Within the message limit, too large to keep: refused as an event.
                        lifecycle("kernel_started", "large", USER1, reason="y" * 100_000),
                        lifecycle("kernel_started", "last", USER1),
                    ]
                )
                with trio.fail_after(10):
                    await wait_until(lambda: hub.published == 3)
                nursery.cancel_scope.cancel()
            frames = await sub.outbox.take()
        got = [_summary(f) for f in frames]
        log_id = server.log.log_id
        assert got == [
            ("kernel_started", "before"),
            (GAP_EVENT, ("upstream-oversized", f"{log_id}:1", f"{log_id}:3")),
            ("kernel_started", "after"),
            (GAP_EVENT, ("upstream-gap", f"{log_id}:3", f"{log_id}:5")),
            ("kernel_started", "last"),
        ]
        assert bridge.malformed == 2
        assert bridge.connects == 2  # one reconnect, not a loop
    finally:
        server.stop(0)


def _summary(frame: bytes) -> tuple[str, object]:
    fields = dict(line.split(": ", 1) for line in frame.decode().strip().split("\n"))
    data = json.loads(fields["data"])
    if fields["event"] == GAP_EVENT:
        return (GAP_EVENT, (data["reason"], data["after"], data["before"]))
    return (fields["event"], data["sessionId"])
