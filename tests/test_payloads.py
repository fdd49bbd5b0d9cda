"""Each API generation's data line, byte for byte, and its rules for any event."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.events import Event
from proxy.hub import encode
from proxy.payloads import (
    EXIT_CODE_EVENTS,
    GENERATIONS,
    JSON_ENCODERS,
    Payload,
    v4_json,
    v5_json,
)

from .test_events import events as any_events

UUID = "7f1b1a1e-0000-4000-8000-000000000001"
KERNEL = Event(
    7,
    "kernel_terminated",
    "mysession-01",
    "0b6c0000-0000-4000-8000-000000000002",
    "AKIA1",
    "u1",
    "default",
    "g1",
    reason="user-requested",
    result="SUCCESS",
    exit_code=0,
    session_uuid=UUID,
    cluster_role="main",
    cluster_idx=0,
)


def test_v5_kernel_event_byte_for_byte() -> None:
    assert v5_json(KERNEL) == (
        b'{"reason":"user-requested","sessionName":"mysession-01","ownerAccessKey":"AKIA1",'
        b'"sessionId":"7f1b1a1e-0000-4000-8000-000000000001","exitCode":0,'
        b'"kernelId":"0b6c0000-0000-4000-8000-000000000002","clusterRole":"main","clusterIdx":0}'
    )


def test_v5_session_event_has_no_kernel_fields_and_exit_code_only_where_it_belongs() -> None:
    started = Event(
        8, "session_started", "mysession-01", "", "AKIA1", "u1", "default", "g1",
        exit_code=3, session_uuid=UUID,
    )  # fmt: skip
    assert json.loads(v5_json(started)) == {
        "reason": None,
        "sessionName": "mysession-01",
        "ownerAccessKey": "AKIA1",
        "sessionId": UUID,
        "exitCode": None,
    }


def test_v4_is_unchanged_and_frames_share_the_id() -> None:
    assert v4_json(KERNEL) == (
        b'{"sessionId":"mysession-01","ownerAccessKey":"AKIA1","reason":"user-requested",'
        b'"result":"SUCCESS","kernelId":"0b6c0000-0000-4000-8000-000000000002","exitCode":0}'
    )
    frames = [encode("log1", KERNEL, payload) for payload in Payload]
    assert {frame.splitlines()[0] for frame in frames} == {b"id: log1:7"}
    assert {frame.splitlines()[1] for frame in frames} == {b"event: kernel_terminated"}
    assert frames[Payload.V5].splitlines()[2] == b"data: " + v5_json(KERNEL)


def test_with_group_adds_only_the_group_to_either_generations_data() -> None:
    for payload in GENERATIONS:
        grouped = payload.with_group()
        assert (grouped.generation, grouped.with_group()) == (payload, grouped)
        base = json.loads(JSON_ENCODERS[payload](KERNEL))
        assert json.loads(JSON_ENCODERS[grouped](KERNEL)) == base | {"group": KERNEL.group_name}
        assert "group" not in base


# test_events' strategy for any event, with names from the generations' families.
events = st.builds(
    dataclasses.replace,
    any_events(st.just(0.0)),
    name=st.sampled_from(
        [
            "kernel_started",
            "kernel_terminated",
            "kernel_terminating",
            "session_success",
            "session_failure",
            "session_started",
            "x_new",
        ]
    ),
)


@given(events)
def test_v5_rules_hold_for_any_event(event: Event) -> None:
    raw = JSON_ENCODERS[Payload.V5](event)
    assert b"\n" not in raw
    assert b"\r" not in raw
    data = json.loads(raw)
    assert "result" not in data
    assert data["sessionName"] == event.session_id
    assert data["sessionId"] == (event.session_uuid or None)
    assert data["exitCode"] == (event.exit_code if event.name in EXIT_CODE_EVENTS else None)
    if event.name.startswith("kernel_"):
        assert data["clusterIdx"] == event.cluster_idx  # 0 included
        assert data["clusterRole"] == (event.cluster_role or None)
        assert data["kernelId"] == (event.kernel_id or None)
    else:
        assert not {"kernelId", "clusterRole", "clusterIdx"} & data.keys()
