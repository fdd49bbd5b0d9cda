"""Server-Sent Events framing (WHATWG HTML, "server-sent events"). Pure: bytes out.

Every field value is checked here, once, so no caller can emit a forged event: a value
holding CR, LF or NUL would end a line or a field early and let upstream text inject
frames of its own.
"""

from __future__ import annotations

from typing import Final


def _check_field(kind: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\x00" in value:
        raise ValueError(f"SSE {kind} must not contain CR, LF or NUL: {value!r}")


def encode_event(name: str, data: str, event_id: str | None = None) -> bytes:
    """One complete event frame. Multi-line ``data`` becomes several ``data:`` lines."""
    _check_field("event name", name)
    if event_id is not None:
        _check_field("id", event_id)
    if not name:
        raise ValueError("SSE event name must not be empty (clients would see 'message')")
    parts: list[str] = []
    if event_id is not None:
        parts.append(f"id: {event_id}\n")
    parts.append(f"event: {name}\n")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_json_event(name: str, data: bytes, event_id: str) -> bytes:
    """The same frame as ``encode_event``, for data that is one line of UTF-8 JSON.

    The hot path: every upstream event is encoded this way once. Names repeat, so a
    name is checked (and its line encoded) once, then only looked up; ``data`` and
    ``event_id`` are still checked every time. Anything else takes the full path.
    """
    line = _EVENT_LINES.get(name)
    # 10 and 13 are LF and CR: testing bytes for an int is far cheaper than for b"\n".
    if (
        line is None
        or 10 in data
        or 13 in data
        or "\n" in event_id
        or "\r" in event_id
        or "\x00" in event_id
    ):
        return _encode_json_event(name, data, event_id)
    return b"id: %s\n%sdata: %s\n\n" % (event_id.encode(), line, data)


def encode_json_event_numbered(name: str, data: bytes, id_prefix: str, number: int) -> bytes:
    """``encode_json_event(name, data, f"{id_prefix}{number}")``, for ids that share a
    prefix (an upstream log's): the prefix is checked and encoded once, then only looked
    up, and a number cannot hold CR, LF or NUL. Anything not seen before takes the
    checked path, which remembers the prefix only once a whole id passed."""
    line = _EVENT_LINES.get(name)
    prefix = _ID_PREFIXES.get(id_prefix)
    if line is None or prefix is None or 10 in data or 13 in data:
        frame = encode_json_event(name, data, f"{id_prefix}{number:d}")
        if len(_ID_PREFIXES) >= _MAX_ID_PREFIXES:
            _ID_PREFIXES.clear()
        _ID_PREFIXES[id_prefix] = id_prefix.encode()
        return frame
    return b"id: %s%d\n%sdata: %s\n\n" % (prefix, number, line, data)


def encode_json_event_without_id(name: str, data: bytes) -> bytes:
    """``encode_event(name, data)`` for one line of UTF-8 JSON, with no ``id:`` line
    (a state's events: they move no client's position). Names cached as above."""
    line = _EVENT_LINES.get(name)
    if line is None or 10 in data or 13 in data:
        return encode_event(name, data.decode("utf-8"))
    return b"%sdata: %s\n\n" % (line, data)


# Id prefixes that passed the checks (a prefix of a checked id), encoded: one per
# upstream log, so a handful; bounded all the same.
_ID_PREFIXES: Final[dict[str, bytes]] = {}
_MAX_ID_PREFIXES: Final = 64

# Event names that passed the checks, with their encoded `event:` line. There are few
# (the kinds of lifecycle event); the bounds keep a stream of odd names from growing it.
_EVENT_LINES: Final[dict[str, bytes]] = {}
_MAX_EVENT_LINES: Final = 1024
_MAX_CACHED_NAME: Final = 256


def _encode_json_event(name: str, data: bytes, event_id: str) -> bytes:
    if 10 in data or 13 in data:  # not one line after all: the general path
        return encode_event(name, data.decode("utf-8"), event_id)
    _check_field("event name", name)
    _check_field("id", event_id)
    if not name:
        raise ValueError("SSE event name must not be empty (clients would see 'message')")
    line = f"event: {name}\n".encode()
    if len(name) <= _MAX_CACHED_NAME:
        if len(_EVENT_LINES) >= _MAX_EVENT_LINES:
            _EVENT_LINES.clear()
        _EVENT_LINES[name] = line
    return b"id: %s\n%sdata: %s\n\n" % (event_id.encode(), line, data)


def encode_comment(text: str = "") -> bytes:
    """A comment line (ignored by clients; used as a heartbeat)."""
    _check_field("comment", text)
    return f": {text}\n\n".encode() if text else b":\n\n"


def encode_position(event_id: str, comment: str = "") -> bytes:
    """An id-only block: moves a client's last event id without dispatching an event."""
    _check_field("id", event_id)
    _check_field("comment", comment)
    return (
        f"id: {event_id}\n: {comment}\n\n".encode() if comment else f"id: {event_id}\n\n".encode()
    )
