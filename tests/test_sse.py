"""SSE framing: exact bytes, field validation, and no frame injection for any input."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import sse
from proxy.sse import (
    encode_comment,
    encode_event,
    encode_json_event,
    encode_json_event_numbered,
)

_FORBIDDEN = ("\r", "\n", "\x00")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


# --- An independent SSE parser (WHATWG HTML, "Interpreting an event stream") ---------


@dataclass(frozen=True)
class ParsedEvent:
    name: str
    data: str
    last_event_id: str | None  # None: no id field has been seen on the stream yet


def parse_stream(raw: bytes) -> list[ParsedEvent]:
    """Events a conforming EventSource dispatches for ``raw`` (a complete stream).

    Written from the standard, not from proxy.sse: lines end at CRLF, CR or LF; a blank
    line dispatches; ``:`` starts a comment; ``field:value`` loses one leading space;
    ``data`` lines are joined with LF; an ``id`` holding NUL is ignored; an event with an
    empty data buffer is not dispatched; an unterminated last event is discarded.
    """
    text = raw.decode("utf-8")
    text = text.removeprefix("\ufeff")
    lines = _LINE_BREAK.split(text)
    # The piece after the last line break is an incomplete line: never processed.
    complete, _incomplete = lines[:-1], lines[-1]
    events: list[ParsedEvent] = []
    event_type = ""
    data = ""
    last_event_id: str | None = None
    id_buffer: str | None = None
    for line in complete:
        if line == "":
            last_event_id = id_buffer
            if data == "":
                event_type = ""
                continue
            events.append(
                ParsedEvent(event_type or "message", data.removesuffix("\n"), last_event_id)
            )
            event_type = ""
            data = ""
            continue
        if line.startswith(":"):
            continue
        field, colon, value = line.partition(":")
        value = value.removeprefix(" ") if colon else ""
        if field == "event":
            event_type = value
        elif field == "data":
            data += value + "\n"
        elif field == "id" and "\x00" not in value:
            id_buffer = value
        # "retry" and unknown fields do not affect dispatch.
    return events


def normalise_newlines(data: str) -> str:
    return data.replace("\r\n", "\n").replace("\r", "\n")


def test_reference_parser_reads_a_textbook_stream() -> None:
    raw = b": hi\r\nid: 7\revent: a\ndata:x\ndata:  y\nretry: 5\n\ndata\n\nevent: lost\n"
    assert parse_stream(raw) == [
        ParsedEvent("a", "x\n y", "7"),
        ParsedEvent("message", "", "7"),
    ]


# --- Exact bytes ----------------------------------------------------------------------


def test_event_without_id_is_event_line_data_line_and_blank_line() -> None:
    assert encode_event("kernel_started", '{"a":1}') == b'event: kernel_started\ndata: {"a":1}\n\n'


def test_event_with_id_puts_the_id_line_first() -> None:
    assert (
        encode_event("kernel_started", "{}", event_id="log-1:42")
        == b"id: log-1:42\nevent: kernel_started\ndata: {}\n\n"
    )


def test_empty_id_is_emitted_as_an_empty_id_line() -> None:
    assert encode_event("e", "d", event_id="") == b"id: \nevent: e\ndata: d\n\n"


def test_none_id_emits_no_id_line() -> None:
    assert b"id:" not in encode_event("e", "d", event_id=None)


def test_empty_data_is_one_empty_data_line() -> None:
    assert encode_event("server_close", "") == b"event: server_close\ndata: \n\n"


def test_multi_line_data_becomes_one_data_line_per_line() -> None:
    assert encode_event("e", "a\nb\n\nc") == b"event: e\ndata: a\ndata: b\ndata: \ndata: c\n\n"


def test_trailing_newline_in_data_becomes_a_trailing_empty_data_line() -> None:
    assert encode_event("e", "a\n") == b"event: e\ndata: a\ndata: \n\n"


def test_crlf_and_cr_in_data_are_normalised_to_separate_data_lines() -> None:
    assert encode_event("e", "a\r\nb\rc\n\rd") == (
        b"event: e\ndata: a\ndata: b\ndata: c\ndata: \ndata: d\n\n"
    )


def test_leading_spaces_in_data_survive_the_one_space_the_parser_strips() -> None:
    frame = encode_event("e", "  two")
    assert frame == b"event: e\ndata:   two\n\n"
    assert parse_stream(frame) == [ParsedEvent("e", "  two", None)]


def test_data_is_encoded_as_utf8() -> None:
    assert encode_event("e", "終了 ✓") == "event: e\ndata: 終了 ✓\n\n".encode()


def test_nul_in_data_is_kept_because_it_cannot_end_a_line() -> None:
    frame = encode_event("e", "a\x00b")
    assert frame == b"event: e\ndata: a\x00b\n\n"
    assert parse_stream(frame) == [ParsedEvent("e", "a\x00b", None)]


def test_unicode_line_separators_in_data_are_not_sse_line_breaks() -> None:
    data = "a\u2028b\u0085c\x0bd\x0ce\x1cf"
    frame = encode_event("e", data)
    assert frame == f"event: e\ndata: {data}\n\n".encode()
    assert parse_stream(frame) == [ParsedEvent("e", data, None)]


def test_every_frame_ends_with_exactly_one_blank_line() -> None:
    frame = encode_event("e", "x\n", event_id="1")
    assert frame.endswith(b"\n\n")
    assert not frame.endswith(b"\n\n\n")


# --- Comments -------------------------------------------------------------------------


def test_comment_with_text() -> None:
    assert encode_comment("ping") == b": ping\n\n"


def test_comment_without_text() -> None:
    assert encode_comment() == b":\n\n"
    assert encode_comment("") == b":\n\n"


@pytest.mark.parametrize("text", ["a\nb", "a\rb", "a\r\nb", "a\x00b", "\n"])
def test_comment_with_line_break_or_nul_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="comment"):
        encode_comment(text)


@given(st.text())
def test_comment_never_dispatches_an_event(text: str) -> None:
    if any(ch in text for ch in _FORBIDDEN):
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            encode_comment(text)
        return
    frame = encode_comment(text)
    assert parse_stream(frame) == []
    # A comment between two frames does not disturb either of them.
    stream = encode_event("a", "1") + frame + encode_event("b", "2")
    assert parse_stream(stream) == [ParsedEvent("a", "1", None), ParsedEvent("b", "2", None)]


# --- Field validation -----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "a\x00b", "\n", "x\r", "\x00"])
def test_event_name_with_cr_lf_or_nul_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="event name"):
        encode_event(bad, "{}")


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "a\x00b", "\n", "x\r", "\x00"])
def test_event_id_with_cr_lf_or_nul_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="id"):
        encode_event("e", "{}", event_id=bad)


def test_injection_attempt_through_the_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        encode_event("kernel_started\ndata: forged\n\nevent: x", "{}")


def test_injection_attempt_through_the_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        encode_event("e", "{}", event_id="1\n\nevent: forged\ndata: x\n")


def test_injection_attempt_through_the_data_stays_inside_the_event() -> None:
    data = 'x\n\nevent: forged\ndata: {"admin":true}\n\nid: 999'
    assert parse_stream(encode_event("e", data, event_id="1")) == [ParsedEvent("e", data, "1")]


# --- Properties: no injection for any input -------------------------------------------


@given(name=st.text(), data=st.text(), event_id=st.none() | st.text())
def test_fields_with_cr_lf_or_nul_always_raise_and_others_never_do(
    name: str, data: str, event_id: str | None
) -> None:
    name_bad = any(ch in name for ch in _FORBIDDEN)
    id_bad = event_id is not None and any(ch in event_id for ch in _FORBIDDEN)
    if name_bad or id_bad:
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            encode_event(name, data, event_id)
    elif not name:
        with pytest.raises(ValueError, match="must not be empty"):
            encode_event(name, data, event_id)
    else:
        frame = encode_event(name, data, event_id)
        assert b"\r" not in frame  # normalised: the proxy only ever emits LF


_SAFE_FIELD = st.text().filter(lambda s: not any(ch in s for ch in _FORBIDDEN))
_SAFE_NAME = st.text(min_size=1).filter(lambda s: not any(ch in s for ch in _FORBIDDEN))


@given(name=_SAFE_NAME, data=st.text(), event_id=st.none() | _SAFE_FIELD)
def test_any_frame_parses_as_exactly_that_one_event(
    name: str, data: str, event_id: str | None
) -> None:
    frame = encode_event(name, data, event_id)
    assert parse_stream(frame) == [ParsedEvent(name, normalise_newlines(data), event_id)]


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1).filter(lambda s: not any(c in s for c in _FORBIDDEN)),
            st.text(),
            st.none() | _SAFE_FIELD,
        ),
        max_size=5,
    )
)
def test_concatenated_frames_parse_as_the_same_sequence_of_events(
    frames: list[tuple[str, str, str | None]],
) -> None:
    stream = b"".join(encode_event(n, d, i) for n, d, i in frames)
    expected: list[ParsedEvent] = []
    last_id: str | None = None
    for name, data, event_id in frames:
        if event_id is not None:
            last_id = event_id
        expected.append(ParsedEvent(name, normalise_newlines(data), last_id))
    assert parse_stream(stream) == expected


# --- encode_json_event: the hot path is encode_event's exact bytes --------------------


@given(name=st.text(), data=st.text(), event_id=st.text())
def test_encode_json_event_is_encode_event_for_any_input(
    name: str, data: str, event_id: str
) -> None:
    """First call (the name is checked and remembered) and second (it is looked up):
    the same bytes as the general encoder, or the same refusal."""
    try:
        expected: bytes | None = encode_event(name, data, event_id)
    except ValueError:
        expected = None
    for _ in range(2):
        try:
            got: bytes | None = encode_json_event(name, data.encode(), event_id)
        except ValueError:
            got = None
        assert got == expected


def test_a_remembered_name_does_not_let_a_bad_id_or_multi_line_data_through() -> None:
    encode_json_event("kernel_started", b"{}", "L:1")
    assert "kernel_started" in sse._EVENT_LINES
    for bad in _FORBIDDEN:
        with pytest.raises(ValueError, match="id"):
            encode_json_event("kernel_started", b"{}", f"L:{bad}2")
    frame = encode_json_event("kernel_started", b'{"a":\n1,\r"b":2}', "L:3")
    assert parse_stream(frame) == [ParsedEvent("kernel_started", '{"a":\n1,\n"b":2}', "L:3")]


def test_refused_names_are_never_remembered() -> None:
    for bad in ["", "a\nb", "a\rb", "a\x00b"]:
        with pytest.raises(ValueError, match="event name"):
            encode_json_event(bad, b"{}", "L:1")
        assert bad not in sse._EVENT_LINES


def test_remembered_names_are_bounded() -> None:
    for i in range(sse._MAX_EVENT_LINES + 10):
        encode_json_event(f"e{i}", b"{}", "L:1")
    encode_json_event("x" * (sse._MAX_CACHED_NAME + 1), b"{}", "L:1")
    assert len(sse._EVENT_LINES) <= sse._MAX_EVENT_LINES
    assert all(len(name) <= sse._MAX_CACHED_NAME for name in sse._EVENT_LINES)


# --- encode_json_event_numbered: ids as a checked prefix and a number -------------------


@given(name=st.text(), data=st.text(), prefix=st.text(), number=st.integers())
def test_numbered_ids_give_encode_json_event_bytes_for_any_input(
    name: str, data: str, prefix: str, number: int
) -> None:
    """First call (the prefix is checked and remembered) and later ones (it is looked
    up, with any number): the same bytes as the checked encoder, or the same refusal."""
    for n in (number, number + 1):
        try:
            expected: bytes | None = encode_json_event(name, data.encode(), f"{prefix}{n}")
        except ValueError:
            expected = None
        for _ in range(2):
            try:
                got: bytes | None = encode_json_event_numbered(name, data.encode(), prefix, n)
            except ValueError:
                got = None
            assert got == expected


def test_a_refused_prefix_is_never_remembered_and_a_remembered_one_checks_the_rest() -> None:
    for bad in _FORBIDDEN:
        with pytest.raises(ValueError, match="id"):
            encode_json_event_numbered("kernel_started", b"{}", f"L{bad}:", 1)
        assert f"L{bad}:" not in sse._ID_PREFIXES
    encode_json_event_numbered("kernel_started", b"{}", "L:", 1)
    assert "L:" in sse._ID_PREFIXES
    with pytest.raises(ValueError, match="event name"):
        encode_json_event_numbered("a\nb", b"{}", "L:", 2)
    frame = encode_json_event_numbered("kernel_started", b'{"a":\n1}', "L:", 3)
    assert parse_stream(frame) == [ParsedEvent("kernel_started", '{"a":\n1}', "L:3")]


def test_remembered_prefixes_are_bounded() -> None:
    for i in range(sse._MAX_ID_PREFIXES + 10):
        encode_json_event_numbered("kernel_started", b"{}", f"log{i}:", 1)
    assert len(sse._ID_PREFIXES) <= sse._MAX_ID_PREFIXES
