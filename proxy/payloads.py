"""What each API generation puts on an event's ``data:`` line. Pure.

- ``Payload.V4``: ``GET /stream/kernel/_/events`` (API v4, the page this project
  implements): ``sessionId`` is the session's *name*, ``result`` on termination
  events (``Event.client_payload``, unchanged since the first release).
- ``Payload.V5``: ``GET /events/session`` (API v5 and later, every SDK since 20.03):
  ``sessionName`` is the name and ``sessionId`` the UUID; ``exitCode`` on the four
  events that carry one; ``kernelId``, ``clusterRole`` and ``clusterIdx`` on
  ``kernel_*`` events (``clusterIdx`` 0 included, which the original dropped). No
  ``result``.

Either with ``group`` added (the session's group name), only for clients that ask
with ``withGroup=true`` (the dashboard: ``Payload.V4_GROUP``, ``Payload.V5_GROUP``);
nobody else's data changes.

``JSON_ENCODERS[payload]`` gives the compact UTF-8 JSON bytes for one event; the hub
calls it once per event and payload that has a recipient, never per client.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Final

import orjson

from .events import Event


class Payload(enum.IntEnum):
    """Which JSON an event is encoded as (an index into JSON_ENCODERS): a generation's,
    or a generation's with ``group``."""

    V4 = 0
    V5 = 1
    V4_GROUP = 2
    V5_GROUP = 3

    @property
    def generation(self) -> Payload:
        """The API generation whose data this is (V4 or V5)."""
        return _GENERATION[self]

    def with_group(self) -> Payload:
        return _WITH_GROUP[self.generation]


# The API generations (metrics labels, per-kernel entities): the payloads without extras.
GENERATIONS: Final = (Payload.V4, Payload.V5)
_GENERATION: Final = {
    Payload.V4: Payload.V4,
    Payload.V5: Payload.V5,
    Payload.V4_GROUP: Payload.V4,
    Payload.V5_GROUP: Payload.V5,
}
_WITH_GROUP: Final = {Payload.V4: Payload.V4_GROUP, Payload.V5: Payload.V5_GROUP}


# The events whose exitCode is an integer on the v5 path (null on every other).
EXIT_CODE_EVENTS: Final = frozenset(
    {"kernel_terminating", "kernel_terminated", "session_success", "session_failure"}
)
KERNEL_PREFIX: Final = "kernel_"
SESSION_PREFIX: Final = "session_"


def v4_json(event: Event) -> bytes:
    return event.client_json_bytes()


def v5_payload(event: Event) -> dict[str, Any]:
    """The JSON object a ``/events/session`` client receives for this event."""
    name = event.name
    payload: dict[str, Any] = {
        "reason": event.reason,
        "sessionName": event.session_id,
        "ownerAccessKey": event.owner_access_key,
        "sessionId": event.session_uuid or None,  # unknown when the upstream predates it
        "exitCode": event.exit_code if name in EXIT_CODE_EVENTS else None,
    }
    if name.startswith(KERNEL_PREFIX):
        payload["kernelId"] = event.kernel_id or None
        payload["clusterRole"] = event.cluster_role or None
        payload["clusterIdx"] = event.cluster_idx
    return payload


def v5_json(event: Event) -> bytes:
    """Compact UTF-8 JSON on one line (orjson escapes every control character)."""
    return orjson.dumps(v5_payload(event))


def v4_group_json(event: Event) -> bytes:
    return orjson.dumps(event.client_payload() | {"group": event.group_name})


def v5_group_json(event: Event) -> bytes:
    return orjson.dumps(v5_payload(event) | {"group": event.group_name})


JSON_ENCODERS: Final[tuple[Callable[[Event], bytes], ...]] = (
    v4_json,
    v5_json,
    v4_group_json,
    v5_group_json,
)
assert len(JSON_ENCODERS) == len(Payload)
