"""SSE event ids: the upstream position of an event, and parsing a client's cursor.

An id is ``<log_id>:<sequence>``: the upstream log's incarnation and the event's
place in it. Both come from the upstream, so an id is the same on every replica and
across proxy restarts. Clients treat it as opaque.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_LOG_ID_RE: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")
_ID_RE: Final = re.compile(r"([0-9A-Za-z_-]{1,64}):([0-9]{1,20})")
_MAX_SEQUENCE: Final = 2**64 - 1


class InvalidEventId(ValueError):
    """A Last-Event-ID that this proxy never issued."""


@dataclass(frozen=True, slots=True)
class Cursor:
    log_id: str
    sequence: int

    def __str__(self) -> str:
        return f"{self.log_id}:{self.sequence}"


def valid_log_id(log_id: str) -> bool:
    return _LOG_ID_RE.fullmatch(log_id) is not None


def format_id(log_id: str, sequence: int) -> str:
    return f"{id_prefix(log_id)}{sequence}"


def id_prefix(log_id: str) -> str:
    """What every event id of a log starts with: ``format_id`` adds the sequence."""
    return f"{log_id}:"


def parse_id(raw: str) -> Cursor:
    match = _ID_RE.fullmatch(raw.strip())
    if match is None:
        raise InvalidEventId(
            f"Last-Event-ID {raw[:80]!r} is not an id from this stream "
            "(expected '<log id>:<sequence>')"
        )
    sequence = int(match.group(2))
    if sequence > _MAX_SEQUENCE:
        raise InvalidEventId(f"Last-Event-ID sequence {sequence} is out of range")
    return Cursor(match.group(1), sequence)
