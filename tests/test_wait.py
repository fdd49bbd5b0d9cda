"""``wait``'s decision, as a pure fold of stream events: when it is over, and how."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.client import StreamEvent
from proxy.wait import Exit, Waiter, describe, implies

UUID_1 = "00000000-0000-4000-8000-000000000001"
UUID_2 = "00000000-0000-4000-8000-000000000002"


def ev(name: str, *, state: bool = False, uuid: str = UUID_1, **data: Any) -> StreamEvent:
    body: dict[str, Any] = {"sessionName": "s", "ownerAccessKey": "AK", "sessionId": uuid}
    body["reason"] = None
    if name.startswith("kernel_"):
        body |= {"kernelId": "k1", "clusterRole": "main", "clusterIdx": 0}
    return StreamEvent(name, body | data, None if state else "L:1", from_state=state)


BEGIN = StreamEvent("stream_state_begin", {"reason": "initial"}, None)
RESYNC = StreamEvent("stream_state_begin", {"reason": "resync"}, None)
END = StreamEvent("stream_state_end", {"entities": 1}, "L:9")


def run(targets: list[str], *events: StreamEvent) -> tuple[Exit, str] | None:
    waiter = Waiter(targets)
    for event in events:
        outcome = waiter.apply(event)
        if outcome is not None:
            return outcome.code, outcome.event.name
    return None


def test_a_later_step_of_the_way_up_implies_the_earlier_ones_of_its_family() -> None:
    assert implies("kernel_started", "kernel_pulling")
    assert implies("session_started", "session_scheduled")
    assert implies("kernel_pulling", "kernel_pulling")
    assert not implies("kernel_pulling", "kernel_started")
    assert not implies("session_started", "kernel_pulling")  # another family
    # Nothing after started says it started: terminating may come from preparing.
    assert not implies("session_terminating", "session_started")
    assert not implies("session_terminated", "session_started")
    assert implies("session_custom", "session_custom")
    assert not implies("session_custom", "session_enqueued")


def test_reached_in_the_state_before_the_wait_began() -> None:
    assert run(["kernel_pulling"], BEGIN, ev("kernel_started", state=True)) == (
        Exit.REACHED,
        "kernel_started",
    )


def test_reached_live() -> None:
    got = run(["session_started"], BEGIN, ev("session_scheduled", state=True), END,
              ev("session_started"))  # fmt: skip
    assert got == (Exit.REACHED, "session_started")
    assert run(["session_started"], BEGIN, END, ev("session_enqueued")) is None


@pytest.mark.parametrize(
    ("ending", "data", "code"),
    [
        ("session_failure", {"exitCode": 1}, Exit.FAILED),
        ("session_terminated", {"exitCode": 137}, Exit.FAILED),
        ("session_cancelled", {}, Exit.CANCELLED),
        ("session_terminated", {"exitCode": None}, Exit.ENDED),
        ("session_success", {"exitCode": 0}, Exit.ENDED),
    ],
)
def test_an_ending_that_is_not_waited_for_ends_the_wait(
    ending: str, data: dict[str, Any], code: Exit
) -> None:
    assert run(["session_started"], BEGIN, END, ev(ending, **data)) == (code, ending)
    assert run(["session_started"], BEGIN, ev(ending, state=True, **data), END) == (code, ending)
    assert run([ending], BEGIN, END, ev(ending, **data)) == (Exit.REACHED, ending)


def test_mid_state_an_ending_waits_for_the_rest_of_the_state() -> None:
    # The main kernel ended, but the session's own events (later in the log) say more.
    waiter = Waiter(["session_started"])
    assert waiter.apply(BEGIN) is None
    assert waiter.apply(ev("kernel_terminated", state=True)) is None
    outcome = waiter.apply(ev("session_started", state=True))
    assert outcome is not None
    assert outcome.code is Exit.REACHED


def test_a_kernel_ending_ends_the_session_only_without_session_events() -> None:
    assert run(["kernel_started"], BEGIN, END, ev("kernel_terminated", exitCode=0)) == (
        Exit.ENDED,
        "kernel_terminated",
    )
    assert run(["session_started"], BEGIN, ev("session_scheduled", state=True), END,
               ev("kernel_terminated")) is None  # fmt: skip
    sub = ev("kernel_terminated", clusterRole="sub", kernelId="k2")
    assert run(["kernel_started"], BEGIN, END, sub) is None


def test_a_reused_name_ends_when_every_session_of_it_has() -> None:
    old = ev("session_terminated", state=True, uuid=UUID_1)
    new = ev("session_scheduled", state=True, uuid=UUID_2)
    assert run(["session_started"], BEGIN, old, new, END) is None
    cancelled = ev("session_cancelled", uuid=UUID_2)
    got = run(["session_started"], BEGIN, old, new, END, cancelled)
    assert got == (Exit.CANCELLED, "session_cancelled")


def test_a_resync_replaces_what_was_known() -> None:
    waiter = Waiter(["session_started"])
    for event in (BEGIN, ev("session_scheduled", state=True), END, RESYNC):
        assert waiter.apply(event) is None
    outcome = waiter.apply(END)  # an empty state: nothing known, nothing ended
    assert outcome is None


def test_describe_says_reason_and_exit_code_in_safe_text() -> None:
    text = describe(ev("session_failure", reason="oom\x1b[2J", exitCode=137))
    assert text == "session_failure (reason=oom\\x1b[2J, exit code 137)"
