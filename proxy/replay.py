"""Replay files: JSON Lines of LifecycleEvent, read whole or followed like ``tail -f``.

Pure apart from ``read_file_events``: this module owns the line format (the protobuf
JSON mapping of LifecycleEvent, one object per line), sequence assignment for lines
that carry none, and splitting appended bytes into lines. Watching the file is the
caller's job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, Final

from google.protobuf import json_format

from ._pb.kernel_events.v1 import events_pb2 as pb

_SHORT_RESULTS: Final = frozenset({"SUCCESS", "FAILURE", "UNDEFINED", "UNSPECIFIED"})
# JSON keys may be a field's proto name or its camelCase JSON name.
_FIELD_BY_KEY: Final = {
    key: field.name
    for field in pb.LifecycleEvent.DESCRIPTOR.fields
    for key in (field.name, field.json_name)
}


class ReplayLineError(ValueError):
    """One line of a replay file that cannot become an event."""

    def __init__(self, lineno: int, problem: str) -> None:
        super().__init__(f"line {lineno}: {problem}")
        self.lineno = lineno
        self.problem = problem


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Plain json.loads keeps the last duplicate, which would silently drop a value.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def parse_line(line: str, lineno: int) -> pb.LifecycleEvent | None:
    """Parse one line; None for a blank line, ReplayLineError for anything invalid."""
    if not line.strip():
        return None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        # LineFollower decodes with surrogateescape, so raw bytes surface here.
        raise ReplayLineError(lineno, "not valid UTF-8") from None
    try:
        obj = json.loads(line, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ReplayLineError(lineno, f"invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise ReplayLineError(lineno, "invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ReplayLineError(lineno, str(exc)) from None
    if not isinstance(obj, dict):
        raise ReplayLineError(lineno, f"expected a JSON object, got {type(obj).__name__}")
    seen: dict[str, str] = {}
    for key in obj:
        field = _FIELD_BY_KEY.get(key)
        if field is None:
            raise ReplayLineError(lineno, f"unknown field {key!r}")
        # json_format keeps whichever of "sessionId"/"session_id" comes last.
        if field in seen:
            raise ReplayLineError(lineno, f"field {key!r} given twice (also as {seen[field]!r})")
        seen[field] = key
    result = obj.get("result")
    if isinstance(result, str) and result in _SHORT_RESULTS:
        obj["result"] = f"RESULT_{result}"
    event = pb.LifecycleEvent()
    try:
        json_format.ParseDict(obj, event, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise ReplayLineError(lineno, str(exc).splitlines()[0]) from None
    if not event.name:
        raise ReplayLineError(lineno, "missing or empty 'name'")
    return event


class SequenceAssigner:
    """Gives sequence-less events the next number; explicit ones must increase."""

    def __init__(self) -> None:
        self.last = 0

    def assign(self, event: pb.LifecycleEvent, lineno: int) -> None:
        if event.sequence == 0:
            event.sequence = self.last + 1
        elif event.sequence <= self.last:
            raise ReplayLineError(
                lineno, f"sequence {event.sequence} does not increase (last was {self.last})"
            )
        self.last = event.sequence


class LineFollower:
    """Splits appended bytes into numbered complete lines, buffering a partial tail.

    Text is decoded with ``surrogateescape`` so a bad line still comes out with its
    number, and ``parse_line`` rejects it, rather than the follower failing.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lineno = 0

    def feed(self, data: bytes) -> list[tuple[int, str]]:
        # Scan only the new bytes for a newline: a long line arriving in small
        # pieces must not be rescanned on every append.
        if b"\n" not in data:
            self._buffer += data
            return []
        self._buffer += data
        *complete, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        lines: list[tuple[int, str]] = []
        for raw in complete:
            self._lineno += 1
            lines.append((self._lineno, raw.decode("utf-8", "surrogateescape")))
        return lines

    def reset(self) -> None:
        """Start over at line 1 with nothing buffered, as after the file was truncated."""
        self._buffer.clear()
        self._lineno = 0


def read_file_events(
    path: str | os.PathLike[str],
) -> Iterator[pb.LifecycleEvent | ReplayLineError]:
    """Parse a file's current contents in order: events (sequenced) and line errors.

    Errors are yielded, never raised, so one bad line cannot hide the rest. A last line
    without a newline counts: this reads a finished file, it does not follow one.
    OSError from opening or reading the file propagates.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    assigner = SequenceAssigner()
    for lineno, text in LineFollower().feed(data):
        try:
            event = parse_line(text, lineno)
            if event is None:
                continue
            assigner.assign(event, lineno)
        except ReplayLineError as exc:
            yield exc
            continue
        yield event
