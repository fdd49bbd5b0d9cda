"""Replay files: line parsing, sequence assignment and following appended bytes."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy.replay import (
    LineFollower,
    ReplayLineError,
    SequenceAssigner,
    parse_line,
    read_file_events,
)
from proxy.simulator import Simulator

_FULL_CAMEL = {
    "name": "kernel_terminated",
    "sessionId": "s1",
    "kernelId": "k1",
    "ownerAccessKey": "AK1",
    "userId": "u1",
    "domainName": "default",
    "groupName": "g1",
    "reason": "self-terminated",
    "result": "SUCCESS",
    "exitCode": 0,
    "sequence": "12",
    "timestamp": "2024-01-01T00:00:00.500Z",
    # Added for API v5 and later; lines without them stay valid.
    "sessionUuid": "7f1b1a1e-0000-4000-8000-000000000001",
    "clusterRole": "sub",
    "clusterIdx": 2,
}
_FULL_EXPECTED = pb.LifecycleEvent(
    name="kernel_terminated",
    session_id="s1",
    kernel_id="k1",
    owner_access_key="AK1",
    user_id="u1",
    domain_name="default",
    group_name="g1",
    reason="self-terminated",
    result=pb.RESULT_SUCCESS,
    exit_code=0,
    sequence=12,
    session_uuid="7f1b1a1e-0000-4000-8000-000000000001",
    cluster_role="sub",
    cluster_idx=2,
)
_FULL_EXPECTED.timestamp.seconds = 1704067200
_FULL_EXPECTED.timestamp.nanos = 500_000_000


def test_every_field_camel_case() -> None:
    assert parse_line(json.dumps(_FULL_CAMEL), 1) == _FULL_EXPECTED


def test_every_field_snake_case() -> None:
    proto_name = {f.json_name: f.name for f in pb.LifecycleEvent.DESCRIPTOR.fields}
    snake = {proto_name[key]: value for key, value in _FULL_CAMEL.items()}
    assert {"owner_access_key", "session_uuid", "cluster_role", "cluster_idx"} <= snake.keys()
    assert parse_line(json.dumps(snake), 1) == _FULL_EXPECTED


def test_a_line_from_before_the_later_fields_still_parses() -> None:
    # A replay file written before session_uuid and the cluster fields existed.
    line = (
        '{"name": "kernel_terminated", "sessionId": "s1", "kernelId": "k1",'
        ' "ownerAccessKey": "AK1", "result": "SUCCESS", "exitCode": 0}'
    )
    event = parse_line(line, 1)
    assert event is not None
    assert (event.name, event.session_id, event.kernel_id) == ("kernel_terminated", "s1", "k1")
    assert (event.session_uuid, event.cluster_role, event.cluster_idx) == ("", "", 0)


def test_optional_fields_stay_absent() -> None:
    event = parse_line('{"name": "kernel_started"}', 1)
    assert event is not None
    assert not event.HasField("reason")
    assert not event.HasField("exit_code")
    assert not event.HasField("timestamp")
    assert (event.sequence, event.result) == (0, pb.RESULT_UNSPECIFIED)
    explicit = parse_line('{"name": "x", "reason": "", "exitCode": 0}', 1)
    assert explicit is not None
    assert explicit.HasField("reason")
    assert explicit.HasField("exit_code")


@pytest.mark.parametrize(
    ("given_result", "expected"),
    [
        ("SUCCESS", pb.RESULT_SUCCESS),
        ("FAILURE", pb.RESULT_FAILURE),
        ("UNDEFINED", pb.RESULT_UNDEFINED),
        ("UNSPECIFIED", pb.RESULT_UNSPECIFIED),
        ("RESULT_SUCCESS", pb.RESULT_SUCCESS),
        ("RESULT_FAILURE", pb.RESULT_FAILURE),
        ("RESULT_UNDEFINED", pb.RESULT_UNDEFINED),
        ("RESULT_UNSPECIFIED", pb.RESULT_UNSPECIFIED),
        (2, pb.RESULT_SUCCESS),
    ],
)
def test_result_forms(given_result: str | int, expected: pb.Result.ValueType) -> None:
    event = parse_line(json.dumps({"name": "kernel_terminated", "result": given_result}), 1)
    assert event is not None
    assert event.result == expected


def test_simulated_events_round_trip() -> None:
    sim = Simulator(random.Random(1))
    for seq in range(1, 301):
        event = sim.next_event()
        event.sequence = seq
        event.timestamp.FromSeconds(1_700_000_000 + seq)
        line = json_format.MessageToJson(event, indent=None)
        assert "\n" not in line
        assert parse_line(line, seq) == event


@pytest.mark.parametrize("line", ["", " ", "\t \r", "\r"])
def test_blank_lines(line: str) -> None:
    assert parse_line(line, 3) is None


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{", "invalid JSON: Expecting property name"),
        ("nope", "invalid JSON: Expecting value"),
        ('{"name": "a"} x', "invalid JSON: Extra data"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('"kernel_started"', "expected a JSON object, got str"),
        ('{"name": "a", "foo": 1}', "unknown field 'foo'"),
        ('{"name": "a", "name": "b"}', "duplicate key 'name'"),
        ('{"name": "a", "sessionId": "s", "session_id": "t"}', "given twice"),
        ('{"name": "a", "clusterIdx": 1, "cluster_idx": 1}', "given twice"),
        ('{"sessionId": "s1"}', "missing or empty 'name'"),
        ('{"name": ""}', "missing or empty 'name'"),
        ('{"name": null}', "missing or empty 'name'"),
        ('{"name": 5}', "name"),
        ('{"name": "a", "exitCode": "abc"}', "exitCode"),
        ('{"name": "a", "exitCode": 1.5}', "exitCode"),
        ('{"name": "a", "clusterIdx": "main"}', "clusterIdx"),
        ('{"name": "a", "clusterIdx": 2147483648}', "clusterIdx"),
        ('{"name": "a", "sessionUuid": 7}', "sessionUuid"),
        ('{"name": "a", "sequence": -1}', "sequence"),
        ('{"name": "a", "result": "MAYBE"}', "MAYBE"),
        ('{"name": "a", "timestamp": "yesterday"}', "timestamp"),
        ('{"name": "\\ud800"}', "name"),
        ("[" * 100_000, "invalid JSON"),
    ],
)
def test_malformed_lines_name_their_line(line: str, problem: str) -> None:
    with pytest.raises(ReplayLineError) as info:
        parse_line(line, 7)
    assert info.value.lineno == 7
    assert str(info.value).startswith("line 7: ")
    assert problem in str(info.value)


def test_non_utf8_line_rejected_with_its_number() -> None:
    follower = LineFollower()
    lines = follower.feed(b'{"name": "a"}\n{"name": "\xff\xfe"}\n')
    assert [n for n, _ in lines] == [1, 2]
    assert parse_line(lines[0][1], 1) is not None
    with pytest.raises(ReplayLineError, match=r"^line 2: not valid UTF-8$") as info:
        parse_line(lines[1][1], 2)
    assert info.value.lineno == 2


def test_sequence_assignment() -> None:
    assigner = SequenceAssigner()
    events = [pb.LifecycleEvent(name="a", sequence=s) for s in (0, 0, 5, 0, 9)]
    for lineno, event in enumerate(events, start=1):
        assigner.assign(event, lineno)
    assert [e.sequence for e in events] == [1, 2, 5, 6, 9]
    assert assigner.last == 9


@pytest.mark.parametrize("sequence", [9, 4])
def test_non_increasing_sequence_rejected(sequence: int) -> None:
    assigner = SequenceAssigner()
    assigner.assign(pb.LifecycleEvent(name="a", sequence=9), 1)
    with pytest.raises(ReplayLineError) as info:
        assigner.assign(pb.LifecycleEvent(name="a", sequence=sequence), 7)
    assert str(info.value) == f"line 7: sequence {sequence} does not increase (last was 9)"
    assert info.value.lineno == 7
    assert assigner.last == 9


_line_text = st.text(st.characters(exclude_characters="\n", codec="utf-8"), max_size=20)


@given(
    lines=st.lists(_line_text, max_size=8),
    tail=_line_text,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_follower_any_split_gives_complete_lines(
    lines: list[str], tail: str, cuts: list[int]
) -> None:
    data = "".join(f"{line}\n" for line in lines).encode() + tail.encode()
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    follower = LineFollower()
    got: list[tuple[int, str]] = []
    for start, end in itertools.pairwise(bounds):
        got += follower.feed(data[start:end])
    assert got == list(enumerate(lines, start=1))
    # The partial tail comes out only once its newline arrives.
    assert follower.feed(b"\n") == [(len(lines) + 1, tail)]


def test_partial_line_waits_for_newline() -> None:
    follower = LineFollower()
    assert follower.feed(b'{"name": "a"}\n{"name"') == [(1, '{"name": "a"}')]
    assert follower.feed(b': "b"}') == []
    assert follower.feed(b"\n\n") == [(2, '{"name": "b"}'), (3, "")]


def test_follower_reset_after_truncation() -> None:
    follower = LineFollower()
    follower.feed(b"one\ntwo\npart")
    follower.reset()
    assert follower.feed(b"new\n") == [(1, "new")]


def test_read_file_events(tmp_path: Path) -> None:
    path = tmp_path / "replay.jsonl"
    path.write_bytes(
        b'{"name": "a"}\n'
        b"\n"
        b"not json\n"
        b'{"name": "b", "sequence": 10}\n'
        b'{"name": "c", "sequence": 3}\n'
        b'{"name": "d"}'  # no final newline: still part of the file
    )
    out = list(read_file_events(path))
    summary = [
        (e.name, e.sequence) if isinstance(e, pb.LifecycleEvent) else (e.lineno, str(e))
        for e in out
    ]
    assert summary == [
        ("a", 1),
        (3, "line 3: invalid JSON: Expecting value"),
        ("b", 10),
        (5, "line 5: sequence 3 does not increase (last was 10)"),
        ("d", 11),
    ]


def test_read_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert list(read_file_events(path)) == []
