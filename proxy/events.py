"""The lifecycle event as the proxy sees it, and its mappings to protobuf and JSON.

Pure: no I/O. ``from_proto`` is the one place upstream messages become Python values,
and ``client_payload`` the one place the wire JSON for SSE clients is decided.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
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
# Names are a small set in practice: the ones found valid are remembered, each with
# whether it ends in a termination suffix (a bounded number of them, so an upstream
# cycling through names costs time, never memory).
_VALID_NAMES: Final[dict[str, bool]] = {}
_MAX_VALID_NAMES: Final = 1024
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
    # Later API generations' fields (after timestamp, so positional constructions of
    # the first twelve stay valid). "" / 0 when unknown, and on session_* events.
    session_uuid: str = ""  # the session's UUID; session_id is its name
    cluster_role: str = ""  # "main", "sub", ... (an open set)
    cluster_idx: int = 0

    def client_payload(self) -> dict[str, Any]:
        """The JSON object clients receive, in the original API's shape."""
        payload: dict[str, Any] = {
            "sessionId": self.session_id,
            "ownerAccessKey": self.owner_access_key,
            "reason": self.reason,
        }
        result = self.result
        if result is None:
            terminal = _VALID_NAMES.get(self.name)
            if terminal is None:
                terminal = self.name.endswith(_TERMINATION_SUFFIXES)
            if terminal:
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


class _EventDraft:
    """An Event under construction: Event's slots, in Event's order, but assignable.

    A frozen dataclass sets each field through object.__setattr__ (about 1 µs for the
    fifteen). from_proto fills a draft by plain assignment instead, then relabels it an
    Event: CPython allows changing ``__class__`` between classes of identical layout.
    The result is an ordinary frozen Event (fields, equality, hash, repr, replace).
    """

    __slots__ = tuple(f.name for f in fields(Event))


_new: Final[Callable[[type], Any]] = object.__new__


def valid_name(name: str) -> bool:
    if name in _VALID_NAMES:
        return True
    if _NAME_RE.fullmatch(name) is None or name in RESERVED_NAMES:
        return False
    if len(_VALID_NAMES) >= _MAX_VALID_NAMES:
        _VALID_NAMES.clear()
    _VALID_NAMES[name] = name.endswith(_TERMINATION_SUFFIXES)
    return True


def from_proto(msg: pb.LifecycleEvent, *, small: bool = False) -> Event:
    """Convert one upstream message; raise MalformedEvent if it cannot be forwarded.

    ``small``: the caller knows the message is within MAX_EVENT_BYTES (the response
    that carries it is), so it is not measured again.
    """
    name = msg.name
    sequence = msg.sequence
    if name not in _VALID_NAMES and not valid_name(name):
        raise MalformedEvent(f"event {sequence}: invalid name {name!r}")
    if sequence == 0:
        raise MalformedEvent(f"event {name!r} has no sequence")
    if not small and msg.ByteSize() > MAX_EVENT_BYTES:
        raise MalformedEvent(f"event {sequence}: larger than {MAX_EVENT_BYTES} bytes")
    # An absent timestamp reads as 0 s + 0 ns: 0.0, as documented, without a presence
    # test. A non-empty reason or non-zero exit code is present; only the default
    # value needs one (``in``: HasField's meaning, at a lower cost).
    ts = msg.timestamp
    reason = msg.reason
    exit_code = msg.exit_code
    draft: Any = _new(_EventDraft)
    draft.sequence = sequence
    draft.name = name
    draft.session_id = msg.session_id
    draft.kernel_id = msg.kernel_id
    draft.owner_access_key = msg.owner_access_key
    draft.user_id = msg.user_id
    draft.domain_name = msg.domain_name
    draft.group_name = msg.group_name
    draft.reason = reason if reason or "reason" in msg else None
    # An enum value this build does not know arrives as a bare int: treat it as
    # unspecified rather than inventing a meaning.
    draft.result = _RESULT_BY_ENUM.get(msg.result)
    draft.exit_code = exit_code if exit_code or "exit_code" in msg else None
    draft.timestamp = ts.seconds + ts.nanos / 1e9
    draft.session_uuid = msg.session_uuid
    draft.cluster_role = msg.cluster_role
    draft.cluster_idx = msg.cluster_idx
    draft.__class__ = Event
    event: Event = draft
    return event


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
        session_uuid=event.session_uuid,
        cluster_role=event.cluster_role,
        cluster_idx=event.cluster_idx,
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
