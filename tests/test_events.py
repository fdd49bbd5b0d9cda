"""Lifecycle events: protobuf mapping, validation, and the client JSON's exact shape."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import events as events_module
from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.events import (
    MAX_EVENT_BYTES,
    RESERVED_NAMES,
    RESULTS,
    Event,
    MalformedEvent,
    from_proto,
    to_proto,
    valid_name,
)
from proxy.sse import encode_event

MAX_SEQUENCE = 2**64 - 1
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_RESULT_ENUM = {
    None: pb.RESULT_UNSPECIFIED,
    "UNDEFINED": pb.RESULT_UNDEFINED,
    "SUCCESS": pb.RESULT_SUCCESS,
    "FAILURE": pb.RESULT_FAILURE,
}


def message(
    name: str = "kernel_started",
    *,
    sequence: int = 1,
    session_id: str = "mysession-01",
    kernel_id: str = "",
    owner_access_key: str = "AKUSER1",
    user_id: str = "u1",
    domain_name: str = "default",
    group_name: str = "g1",
    reason: str | None = None,
    result: int = pb.RESULT_UNSPECIFIED,
    exit_code: int | None = None,
) -> pb.LifecycleEvent:
    msg = pb.LifecycleEvent(
        sequence=sequence,
        name=name,
        session_id=session_id,
        kernel_id=kernel_id,
        owner_access_key=owner_access_key,
        user_id=user_id,
        domain_name=domain_name,
        group_name=group_name,
    )
    # Set as a bare int: an enum value this build does not know must be representable.
    msg.result = result  # type: ignore[assignment]
    if reason is not None:
        msg.reason = reason
    if exit_code is not None:
        msg.exit_code = exit_code
    return msg


def payload(msg: pb.LifecycleEvent) -> dict[str, Any]:
    return from_proto(msg).client_payload()


# --- from_proto -----------------------------------------------------------------------


def test_from_proto_copies_every_field() -> None:
    msg = message(
        "kernel_terminated",
        sequence=17,
        session_id="s1",
        kernel_id="k1",
        owner_access_key="AK1",
        user_id="u9",
        domain_name="research",
        group_name="g7",
        reason="self-terminated",
        result=pb.RESULT_SUCCESS,
        exit_code=3,
    )
    msg.timestamp.seconds = 1_700_000_000
    msg.timestamp.nanos = 500_000_000
    msg.session_uuid = "7f1b1a1e-0000-4000-8000-000000000001"
    msg.cluster_role = "sub"
    msg.cluster_idx = 2
    assert from_proto(msg) == Event(
        sequence=17,
        name="kernel_terminated",
        session_id="s1",
        kernel_id="k1",
        owner_access_key="AK1",
        user_id="u9",
        domain_name="research",
        group_name="g7",
        reason="self-terminated",
        result="SUCCESS",
        exit_code=3,
        timestamp=1_700_000_000.5,
        session_uuid="7f1b1a1e-0000-4000-8000-000000000001",
        cluster_role="sub",
        cluster_idx=2,
    )


def test_from_proto_absent_optionals_become_none_and_zero_timestamp() -> None:
    event = from_proto(message())
    assert event.reason is None
    assert event.exit_code is None
    assert event.result is None
    assert event.timestamp == 0.0
    assert (event.session_uuid, event.cluster_role, event.cluster_idx) == ("", "", 0)


def test_the_first_twelve_fields_keep_their_positions() -> None:
    # Later generations' fields were added after timestamp: positional constructions
    # written before them mean what they meant.
    event = Event(1, "kernel_started", "s", "k", "AK", "u", "d", "g", None, None, None, 2.0)
    assert (event.session_id, event.kernel_id, event.timestamp) == ("s", "k", 2.0)
    assert (event.session_uuid, event.cluster_role, event.cluster_idx) == ("", "", 0)


def test_from_proto_keeps_an_empty_reason_distinct_from_absent() -> None:
    assert from_proto(message(reason="")).reason == ""


def test_from_proto_keeps_exit_code_zero_distinct_from_absent() -> None:
    assert from_proto(message(exit_code=0)).exit_code == 0


@pytest.mark.parametrize(
    ("enum", "expected"),
    [
        (pb.RESULT_UNSPECIFIED, None),
        (pb.RESULT_UNDEFINED, "UNDEFINED"),
        (pb.RESULT_SUCCESS, "SUCCESS"),
        (pb.RESULT_FAILURE, "FAILURE"),
    ],
)
def test_from_proto_maps_each_result(enum: int, expected: str | None) -> None:
    assert from_proto(message(result=enum)).result == expected


@pytest.mark.parametrize("unknown", [4, 7, 99, 2**31 - 1, -1])
def test_unknown_result_enum_value_is_treated_as_unspecified(unknown: int) -> None:
    assert from_proto(message("kernel_started", result=unknown)).result is None
    assert from_proto(message("kernel_terminated", result=unknown)).result is None


def test_unknown_result_survives_the_wire_and_is_still_unspecified() -> None:
    wire = message("kernel_terminated", result=42).SerializeToString()
    assert payload(pb.LifecycleEvent.FromString(wire))["result"] == "UNDEFINED"


def test_from_proto_converts_the_timestamp_to_float_seconds() -> None:
    msg = message()
    msg.timestamp.seconds = 1_700_000_000
    msg.timestamp.nanos = 250_000_000
    assert from_proto(msg).timestamp == 1_700_000_000.25


@given(seconds=st.integers(0, 2**33), nanos=st.integers(0, 999_999_999))
def test_from_proto_timestamp_is_within_a_microsecond(seconds: int, nanos: int) -> None:
    msg = message()
    msg.timestamp.seconds = seconds
    msg.timestamp.nanos = nanos
    assert from_proto(msg).timestamp == pytest.approx(seconds + nanos / 1e9, abs=1e-6)


# --- Validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("kernel started", id="space"),
        pytest.param("kernel_started\r", id="cr"),
        pytest.param("kernel_started\n", id="lf"),
        pytest.param("kernel\r\nstarted", id="crlf"),
        pytest.param("kernel\x00started", id="nul"),
        pytest.param("kernel\tstarted", id="tab"),
        pytest.param("kernel\x7fstarted", id="del"),
        pytest.param("kernel_démarré", id="non-ascii"),
        pytest.param("k" * 129, id="129-chars"),
        pytest.param("kernel_started\n\ndata: forged", id="injection"),
    ],
)
def test_invalid_names_raise_malformed_event(name: str) -> None:
    assert not valid_name(name)
    with pytest.raises(MalformedEvent, match="invalid name"):
        from_proto(message(name))


@pytest.mark.parametrize(
    "name",
    ["kernel_started", "session_enqueued", "kernel-started", "x", "k" * 128, "a.b:c/d!~"],
)
def test_valid_names_are_accepted_as_an_open_set(name: str) -> None:
    assert valid_name(name)
    assert from_proto(message(name)).name == name


def test_sequence_zero_raises_malformed_event() -> None:
    with pytest.raises(MalformedEvent, match="no sequence"):
        from_proto(message(sequence=0))


def test_largest_sequence_is_accepted() -> None:
    assert from_proto(message(sequence=MAX_SEQUENCE)).sequence == MAX_SEQUENCE


def test_malformed_event_is_a_value_error() -> None:
    assert issubclass(MalformedEvent, ValueError)


def test_malformed_event_message_escapes_the_name() -> None:
    with pytest.raises(MalformedEvent) as info:
        from_proto(message("a\r\nb"))
    assert "\n" not in str(info.value)


@given(st.text(max_size=200))
def test_any_name_from_proto_accepts_is_safe_for_an_sse_event_line(name: str) -> None:
    try:
        event = from_proto(message(name))
    except MalformedEvent:
        return
    assert 1 <= len(event.name) <= 128
    assert " " not in event.name
    encode_event(event.name, event.client_json())  # never raises


# --- Round trip -----------------------------------------------------------------------


def events(timestamps: st.SearchStrategy[float]) -> st.SearchStrategy[Event]:
    text = st.text()
    return st.builds(
        Event,
        sequence=st.integers(1, MAX_SEQUENCE),
        name=st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True),
        session_id=text,
        kernel_id=text,
        owner_access_key=text,
        user_id=text,
        domain_name=text,
        group_name=text,
        reason=st.none() | text,
        result=st.sampled_from([None, *RESULTS]),
        exit_code=st.none() | INT32,
        timestamp=timestamps,
        session_uuid=text,
        cluster_role=text,
        cluster_idx=INT32,
    )


# Whole seconds below 2**32 and halves below 2**31 (until 2106 and 2038) are exact in
# binary floating point even when multiplied by 1e9, so they round trip exactly.
exact_timestamps = (
    st.just(0.0)
    | st.integers(1, 2**32 - 1).map(float)
    | st.integers(1, 2**31 - 1).map(lambda s: s + 0.5)
)


@given(events(exact_timestamps))
def test_event_to_proto_and_back_is_identity(event: Event) -> None:
    assert from_proto(to_proto(event)) == event


@given(events(exact_timestamps))
def test_event_survives_protobuf_serialisation(event: Event) -> None:
    wire = to_proto(event).SerializeToString()
    assert from_proto(pb.LifecycleEvent.FromString(wire)) == event


@given(
    event=events(st.just(0.0)),
)
def test_proto_to_event_and_back_is_identity(event: Event) -> None:
    msg = to_proto(event)
    assert to_proto(from_proto(msg)) == msg


def test_to_proto_sets_optional_fields_only_when_present() -> None:
    bare = to_proto(from_proto(message()))
    assert not bare.HasField("reason")
    assert not bare.HasField("exit_code")
    assert not bare.HasField("timestamp")
    full = to_proto(from_proto(message(reason="", exit_code=0)))
    assert full.HasField("reason")
    assert full.reason == ""
    assert full.HasField("exit_code")
    assert full.exit_code == 0


@pytest.mark.parametrize(("result", "enum"), list(_RESULT_ENUM.items()))
def test_to_proto_maps_each_result(result: str | None, enum: int) -> None:
    event = from_proto(message())
    assert to_proto(replace(event, result=result)).result == enum


# Up to 2**32 s (year 2106) a float still resolves well under a microsecond.
@given(st.floats(min_value=-(2.0**32), max_value=2.0**32).filter(bool))
def test_to_proto_always_produces_a_valid_timestamp(timestamp: float) -> None:
    event = replace(from_proto(message()), timestamp=timestamp)
    ts = to_proto(event).timestamp
    assert 0 <= ts.nanos <= 999_999_999
    assert ts.seconds + ts.nanos / 1e9 == pytest.approx(timestamp, abs=1e-6)


# --- Client payload -------------------------------------------------------------------


def test_payload_has_exactly_the_original_fields_for_a_plain_event() -> None:
    assert payload(message("kernel_started", session_id="s1", owner_access_key="AK1")) == {
        "sessionId": "s1",
        "ownerAccessKey": "AK1",
        "reason": None,
    }


def test_payload_never_leaks_internal_fields() -> None:
    msg = message(
        "kernel_terminated", user_id="secret-user", domain_name="dom-x", group_name="grp-y"
    )
    msg.timestamp.seconds = 1_700_000_000
    body = from_proto(msg).client_json()
    for internal in ("secret-user", "dom-x", "grp-y", "1700000000", "sequence", "timestamp"):
        assert internal not in body


def test_v4_payload_ignores_later_generations_fields() -> None:
    # API v4 clients get exactly what they got before session_uuid and the cluster
    # fields existed, byte for byte.
    msg = message("kernel_terminated", kernel_id="k1", reason="r", exit_code=0)
    before = from_proto(msg).client_json_bytes()
    msg.session_uuid = "7f1b1a1e-0000-4000-8000-000000000001"
    msg.cluster_role = "main"
    msg.cluster_idx = 3
    assert from_proto(msg).client_json_bytes() == before


def test_reason_is_null_when_absent() -> None:
    body = from_proto(message()).client_json()
    assert '"reason":null' in body


def test_empty_reason_is_kept_as_empty_string() -> None:
    assert payload(message(reason=""))["reason"] == ""


def test_reason_is_passed_through() -> None:
    assert payload(message(reason="user-requested"))["reason"] == "user-requested"


@pytest.mark.parametrize(
    "name",
    [
        "kernel_terminated",
        "session_terminated",
        "kernel_cancelled",
        "session_cancelled",
        "kernel_success",
        "session_success",
        "kernel_failure",
        "session_failure",
    ],
)
def test_termination_event_without_result_says_undefined(name: str) -> None:
    assert payload(message(name))["result"] == "UNDEFINED"


@pytest.mark.parametrize(
    "name",
    [
        "kernel_enqueued",
        "kernel_preparing",
        "kernel_pulling",
        "kernel_creating",
        "kernel_started",
        "kernel_terminating",  # not yet terminated
        "session_started",
        "kernel_terminated_x",
    ],
)
def test_non_termination_event_without_result_has_no_result_key(name: str) -> None:
    assert "result" not in payload(message(name))


@pytest.mark.parametrize(
    ("enum", "expected"),
    [
        (pb.RESULT_UNDEFINED, "UNDEFINED"),
        (pb.RESULT_SUCCESS, "SUCCESS"),
        (pb.RESULT_FAILURE, "FAILURE"),
    ],
)
@pytest.mark.parametrize("name", ["kernel_terminated", "kernel_started", "kernel_terminating"])
def test_result_is_present_whenever_the_upstream_set_it(
    name: str, enum: int, expected: str
) -> None:
    assert payload(message(name, result=enum))["result"] == expected


def test_unknown_result_on_a_non_termination_event_has_no_result_key() -> None:
    assert "result" not in payload(message("kernel_started", result=9))


def test_kernel_id_is_present_only_when_non_empty() -> None:
    assert "kernelId" not in payload(message(kernel_id=""))
    assert payload(message(kernel_id="k-123"))["kernelId"] == "k-123"


def test_exit_code_is_present_only_when_set_including_zero() -> None:
    assert "exitCode" not in payload(message())
    assert payload(message(exit_code=0))["exitCode"] == 0
    assert payload(message(exit_code=-9))["exitCode"] == -9
    assert payload(message(exit_code=137))["exitCode"] == 137


def test_client_json_exact_text_with_every_field_in_order() -> None:
    msg = message(
        "kernel_terminated",
        session_id="mysession-01",
        owner_access_key="MYACCESSKEY",
        kernel_id="k1",
        reason="self-terminated",
        result=pb.RESULT_SUCCESS,
        exit_code=0,
    )
    assert from_proto(msg).client_json() == (
        '{"sessionId":"mysession-01","ownerAccessKey":"MYACCESSKEY",'
        '"reason":"self-terminated","result":"SUCCESS","kernelId":"k1","exitCode":0}'
    )


def test_client_json_matches_the_documented_example() -> None:
    msg = message(
        "kernel_terminated",
        session_id="mysession-01",
        owner_access_key="MYACCESSKEY",
        reason="self-terminated",
        result=pb.RESULT_SUCCESS,
    )
    assert json.loads(from_proto(msg).client_json()) == {
        "sessionId": "mysession-01",
        "ownerAccessKey": "MYACCESSKEY",
        "reason": "self-terminated",
        "result": "SUCCESS",
    }


def test_client_json_is_compact() -> None:
    assert from_proto(message(session_id="s", owner_access_key="a")).client_json() == (
        '{"sessionId":"s","ownerAccessKey":"a","reason":null}'
    )


def test_client_json_keeps_non_ascii_as_utf8() -> None:
    body = from_proto(message(session_id="세션", reason="終了 ✓")).client_json()
    assert "세션" in body
    assert "終了 ✓" in body
    assert "\\u" not in body
    assert "終了".encode() in body.encode()


@given(
    session_id=st.text(),
    owner=st.text(),
    reason=st.none() | st.text(),
    kernel_id=st.text(),
)
def test_client_json_is_one_line_and_decodes_to_the_payload(
    session_id: str, owner: str, reason: str | None, kernel_id: str
) -> None:
    event = from_proto(
        message(session_id=session_id, owner_access_key=owner, reason=reason, kernel_id=kernel_id)
    )
    body = event.client_json()
    assert "\n" not in body
    assert "\r" not in body
    assert "\x00" not in body
    assert json.loads(body) == event.client_payload()
    assert encode_event(event.name, body).count(b"\ndata: ") == 1


def test_event_is_immutable() -> None:
    event = from_proto(message())
    with pytest.raises(AttributeError):
        event.name = "other"  # type: ignore[misc]


# --- The fast construction path gives an ordinary Event --------------------------------


def test_from_proto_gives_a_plain_frozen_event_equal_to_a_constructed_one() -> None:
    msg = message(
        "kernel_terminated", sequence=5, kernel_id="k", reason="r", result=pb.RESULT_FAILURE
    )
    msg.exit_code = 137
    msg.timestamp.seconds = 1_700_000_000
    event = from_proto(msg)
    expected = Event(
        sequence=5,
        name="kernel_terminated",
        session_id="mysession-01",
        kernel_id="k",
        owner_access_key="AKUSER1",
        user_id="u1",
        domain_name="default",
        group_name="g1",
        reason="r",
        result="FAILURE",
        exit_code=137,
        timestamp=1_700_000_000.0,
    )
    assert type(event) is Event
    assert event == expected
    assert hash(event) == hash(expected)
    assert repr(event) == repr(expected)
    assert replace(event, reason=None) == replace(expected, reason=None)
    with pytest.raises(FrozenInstanceError):
        event.reason = "other"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del event.reason


def test_a_present_zero_timestamp_and_an_absent_one_are_both_float_zero() -> None:
    msg = message()
    msg.timestamp.SetInParent()  # present, 0 s and 0 ns
    assert msg.HasField("timestamp")
    for m in (msg, message()):
        timestamp = from_proto(m).timestamp
        assert timestamp == 0.0
        assert type(timestamp) is float


def test_remembered_names_are_bounded_and_never_reserved_or_invalid() -> None:
    for i in range(events_module._MAX_VALID_NAMES + 10):
        assert valid_name(f"kernel_{i}")
    assert len(events_module._VALID_NAMES) <= events_module._MAX_VALID_NAMES
    for name in [*RESERVED_NAMES, "", "a b", "a\nb", "k" * 129]:
        for _ in range(2):
            assert not valid_name(name)
            with pytest.raises(MalformedEvent, match="invalid name"):
                from_proto(message(name))
        assert name not in events_module._VALID_NAMES


def test_small_only_spares_measuring_and_every_other_check_still_runs() -> None:
    big = message(reason="r" * MAX_EVENT_BYTES)
    with pytest.raises(MalformedEvent, match="larger than"):
        from_proto(big)
    huge_uuid = message()
    huge_uuid.session_uuid = "u" * MAX_EVENT_BYTES  # an open field, bounded only by size
    with pytest.raises(MalformedEvent, match="larger than"):
        from_proto(huge_uuid)
    assert from_proto(big, small=True).reason == big.reason  # the caller vouched for it
    with pytest.raises(MalformedEvent, match="invalid name"):
        from_proto(message("a b"), small=True)
    with pytest.raises(MalformedEvent, match="no sequence"):
        from_proto(message(sequence=0), small=True)
