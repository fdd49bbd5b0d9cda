"""The lifecycle event as the proxy sees it, and its mappings to protobuf and JSON.

Pure: no I/O. ``from_proto`` is the one place upstream messages become Python values,
and ``client_payload`` the one place the wire JSON for SSE clients is decided.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ._pb.kernel_events.v1 import events_pb2 as pb

RESULTS: Final = ("UNDEFINED", "SUCCESS", "FAILURE")
_RESULT_BY_ENUM: Final = {
    pb.RESULT_UNDEFINED: "UNDEFINED",
    pb.RESULT_SUCCESS: "SUCCESS",
    pb.RESULT_FAILURE: "FAILURE",
}
_ENUM_BY_RESULT: Final = {v: k for k, v in _RESULT_BY_ENUM.items()}
# Names are an open set, but they become an SSE `event:` line: nothing that could end
# the line or be mistaken for framing may pass. Printable, no spaces, bounded.
_NAME_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")
# The proxy's own stream notices (hub.GAP_EVENT, OVERFLOW_EVENT, SERVER_CLOSE_EVENT): an
# upstream event by one of these names would pass for one (the official SDK stops
# listening on server_close), so the upstream may not use them.
RESERVED_NAMES: Final = frozenset({"stream_gap", "stream_overflow", "server_close"})
# An event is a few hundred bytes; one far larger would be kept in the history and
# written to every recipient. Bigger than this, it is refused (and becomes a gap).
MAX_EVENT_BYTES: Final = 64 * 1024
# Events whose payload carries `result` even when the upstream left it unspecified.
_TERMINATION_SUFFIXES: Final = ("_terminated", "_success", "_failure", "_cancelled")


class MalformedEvent(ValueError):
    """An upstream event the proxy cannot forward safely."""


@dataclass(frozen=True, slots=True)
class Event:
    sequence: int
    name: str
    session_id: str
    kernel_id: str
    owner_access_key: str
    user_id: str
    domain_name: str
    group_name: str
    reason: str | None = None
    result: str | None = None  # one of RESULTS, or None when unspecified
    exit_code: int | None = None
    timestamp: float = 0.0  # seconds since the epoch; 0.0 when the upstream sent none

    def client_payload(self) -> dict[str, Any]:
        """The JSON object clients receive, in the original API's shape."""
        payload: dict[str, Any] = {
            "sessionId": self.session_id,
            "ownerAccessKey": self.owner_access_key,
            "reason": self.reason,
        }
        result = self.result
        if result is None and self.name.endswith(_TERMINATION_SUFFIXES):
            result = "UNDEFINED"
        if result is not None:
            payload["result"] = result
        if self.kernel_id:
            payload["kernelId"] = self.kernel_id
        if self.exit_code is not None:
            payload["exitCode"] = self.exit_code
        return payload

    def client_json_bytes(self) -> bytes:
        """Compact UTF-8 JSON on one line (orjson escapes every control character)."""
        return orjson.dumps(self.client_payload())

    def client_json(self) -> str:
        return self.client_json_bytes().decode("utf-8")


def valid_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None and name not in RESERVED_NAMES


def from_proto(msg: pb.LifecycleEvent) -> Event:
    """Convert one upstream message; raise MalformedEvent if it cannot be forwarded."""
    if not valid_name(msg.name):
        raise MalformedEvent(f"event {msg.sequence}: invalid name {msg.name!r}")
    if msg.sequence == 0:
        raise MalformedEvent(f"event {msg.name!r} has no sequence")
    if msg.ByteSize() > MAX_EVENT_BYTES:
        raise MalformedEvent(f"event {msg.sequence}: larger than {MAX_EVENT_BYTES} bytes")
    ts = msg.timestamp.seconds + msg.timestamp.nanos / 1e9 if msg.HasField("timestamp") else 0.0
    return Event(
        sequence=msg.sequence,
        name=msg.name,
        session_id=msg.session_id,
        kernel_id=msg.kernel_id,
        owner_access_key=msg.owner_access_key,
        user_id=msg.user_id,
        domain_name=msg.domain_name,
        group_name=msg.group_name,
        reason=msg.reason if msg.HasField("reason") else None,
        # An enum value this build does not know arrives as a bare int: treat it as
        # unspecified rather than inventing a meaning.
        result=_RESULT_BY_ENUM.get(msg.result),
        exit_code=msg.exit_code if msg.HasField("exit_code") else None,
        timestamp=ts,
    )


def to_proto(event: Event) -> pb.LifecycleEvent:
    msg = pb.LifecycleEvent(
        sequence=event.sequence,
        name=event.name,
        session_id=event.session_id,
        kernel_id=event.kernel_id,
        owner_access_key=event.owner_access_key,
        user_id=event.user_id,
        domain_name=event.domain_name,
        group_name=event.group_name,
        result=_ENUM_BY_RESULT.get(event.result, pb.RESULT_UNSPECIFIED)
        if event.result
        else pb.RESULT_UNSPECIFIED,
    )
    if event.reason is not None:
        msg.reason = event.reason
    if event.exit_code is not None:
        msg.exit_code = event.exit_code
    if event.timestamp:
        msg.timestamp.FromNanoseconds(round(event.timestamp * 1e9))
    return msg
