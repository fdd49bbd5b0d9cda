"""Event ids: ``<log id>:<sequence>`` round trips, and every malformed cursor is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.eventid import Cursor, InvalidEventId, format_id, id_prefix, parse_id, valid_log_id

MAX_SEQUENCE = 2**64 - 1

log_ids = st.from_regex(r"[0-9A-Za-z_-]{1,64}", fullmatch=True)
sequences = st.integers(min_value=0, max_value=MAX_SEQUENCE)


# --- Round trip -----------------------------------------------------------------------


@given(log_id=log_ids, sequence=sequences)
def test_parse_inverts_format(log_id: str, sequence: int) -> None:
    assert parse_id(format_id(log_id, sequence)) == Cursor(log_id, sequence)


@given(log_id=log_ids, sequence=sequences)
def test_cursor_str_is_the_formatted_id(log_id: str, sequence: int) -> None:
    cursor = Cursor(log_id, sequence)
    assert str(cursor) == format_id(log_id, sequence)
    assert parse_id(str(cursor)) == cursor


def test_format_is_log_id_colon_decimal_sequence() -> None:
    assert format_id("abc-1_Z", 42) == "abc-1_Z:42"
    assert format_id("x", 0) == "x:0"


@given(log_id=log_ids, sequence=sequences)
def test_an_id_is_its_logs_prefix_then_the_sequence(log_id: str, sequence: int) -> None:
    assert id_prefix(log_id) + str(sequence) == format_id(log_id, sequence)


def test_largest_sequence_is_accepted() -> None:
    assert parse_id(f"log:{MAX_SEQUENCE}") == Cursor("log", MAX_SEQUENCE)


def test_sequence_zero_is_accepted() -> None:
    assert parse_id("log:0") == Cursor("log", 0)


def test_longest_log_id_is_accepted() -> None:
    assert parse_id("a" * 64 + ":1") == Cursor("a" * 64, 1)


def test_leading_zeros_in_sequence_parse_to_the_same_number() -> None:
    assert parse_id("log:007") == Cursor("log", 7)


@pytest.mark.parametrize("raw", [" log:1", "log:1 ", "\tlog:1\t", "  log:1  "])
def test_surrounding_whitespace_is_tolerated_as_in_an_http_header(raw: str) -> None:
    assert parse_id(raw) == Cursor("log", 1)


def test_cursor_is_immutable_and_hashable() -> None:
    cursor = Cursor("log", 1)
    with pytest.raises(AttributeError):
        cursor.sequence = 2  # type: ignore[misc]
    assert {cursor, Cursor("log", 1)} == {cursor}


# --- valid_log_id ---------------------------------------------------------------------


@given(log_ids)
def test_generated_log_ids_are_valid(log_id: str) -> None:
    assert valid_log_id(log_id)


@pytest.mark.parametrize(
    "log_id", ["", "a" * 65, "a b", "a:b", "é", "\uff11\uff12", "a\n", "a.b", "a/b", "\x00"]
)
def test_invalid_log_ids(log_id: str) -> None:
    assert not valid_log_id(log_id)


# --- Rejection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("log", id="no-colon"),
        pytest.param("12345", id="digits-only"),
        pytest.param(":1", id="empty-log-id"),
        pytest.param("log:", id="empty-sequence"),
        pytest.param(":", id="colon-only"),
        pytest.param("log:abc", id="sequence-not-digits"),
        pytest.param("log:1a", id="sequence-trailing-letter"),
        pytest.param("log:0x10", id="sequence-hex"),
        pytest.param("log:1.0", id="sequence-decimal-point"),
        pytest.param("log:1e3", id="sequence-exponent"),
        pytest.param("log:-1", id="negative"),
        pytest.param("log:+1", id="plus-sign"),
        pytest.param("log:1_000", id="sequence-underscore"),
        pytest.param(f"log:{MAX_SEQUENCE + 1}", id="just-above-max"),
        pytest.param("log:99999999999999999999", id="twenty-nines"),
        pytest.param("log:" + "0" * 20 + "1", id="sequence-21-digits"),
        pytest.param("log:" + "9" * 1000, id="sequence-huge"),
        pytest.param("a" * 65 + ":1", id="log-id-65-chars"),
        pytest.param("lo g:1", id="space-in-log-id"),
        pytest.param("log :1", id="space-before-colon"),
        pytest.param("log: 1", id="space-after-colon"),
        pytest.param("log:1 2", id="space-in-sequence"),
        pytest.param("log:1\n2", id="newline-inside"),
        pytest.param("log:1\x002", id="nul-inside"),
        pytest.param("log:1:2", id="two-colons"),
        pytest.param("a:b:1", id="colon-in-log-id"),
        pytest.param("log:\uff11\uff12", id="fullwidth-digits"),
        pytest.param("log:١٢", id="arabic-indic-digits"),
        pytest.param("log:²", id="superscript-digit"),
        pytest.param("lög:1", id="non-ascii-log-id"),
        pytest.param("log.1:1", id="dot-in-log-id"),
        pytest.param("x" * 10_000, id="overlong"),
    ],
)
def test_malformed_ids_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidEventId):
        parse_id(raw)


def test_invalid_event_id_is_a_value_error() -> None:
    assert issubclass(InvalidEventId, ValueError)


def test_message_shows_the_input_and_the_expected_form() -> None:
    with pytest.raises(InvalidEventId) as info:
        parse_id("nonsense")
    message = str(info.value)
    assert "Last-Event-ID" in message
    assert "'nonsense'" in message
    assert "<log id>:<sequence>" in message


def test_message_for_long_input_is_truncated() -> None:
    raw = "A" * 5000 + "-tail-marker"
    with pytest.raises(InvalidEventId) as info:
        parse_id(raw)
    message = str(info.value)
    assert len(message) < 250
    assert "A" * 80 in message
    assert "A" * 81 not in message
    assert "tail-marker" not in message


def test_message_never_carries_raw_line_breaks() -> None:
    with pytest.raises(InvalidEventId) as info:
        parse_id("x\r\nSet-Cookie: evil")
    message = str(info.value)
    assert "\n" not in message
    assert "\r" not in message


def test_out_of_range_message_names_the_problem() -> None:
    with pytest.raises(InvalidEventId, match="out of range"):
        parse_id(f"log:{MAX_SEQUENCE + 1}")


@given(st.text())
def test_any_text_parses_to_a_valid_cursor_or_raises_invalid_event_id(raw: str) -> None:
    try:
        cursor = parse_id(raw)
    except InvalidEventId as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        assert len(message) < 400
        return
    assert valid_log_id(cursor.log_id)
    assert 0 <= cursor.sequence <= MAX_SEQUENCE
    assert parse_id(str(cursor)) == cursor


@given(log_id=log_ids, sequence=sequences, junk=st.sampled_from([" ", "\x00", "\n", "x", "\uff11"]))
def test_inserting_a_foreign_character_inside_the_id_rejects_it(
    log_id: str, sequence: int, junk: str
) -> None:
    raw = format_id(log_id, sequence)
    colon = raw.index(":")
    # Right after the colon: a sequence must begin with an ASCII digit.
    with pytest.raises(InvalidEventId):
        parse_id(raw[: colon + 1] + junk + raw[colon + 1 :])
