"""A deterministic, plausible kernel lifecycle generator for demos and tests.

Pure: no clock, no I/O. It owns the demo tenants and the shape of a session's life;
the caller owns sequences (the log assigns them) and timestamps (stamped on write).
Each session's whole script is decided when it starts, so its events can only come
out in lifecycle order however the sessions interleave.

The shape is the original manager's (23.09 line), as its ``GET /events/session``
handler forwards it:

- ``session_enqueued``; then either a cancellation while pending (``kernel_cancelled``
  per kernel, ``session_cancelled``), or ``session_scheduled`` and the kernels'
  start: per kernel ``kernel_preparing``, ``kernel_pulling`` (only when the agent
  lacks the image; its reason is the image's canonical name), ``kernel_creating``,
  ``kernel_started``, the kernels interleaved, then ``session_started``. A start that
  fails cancels every kernel on its way (``kernel_cancelled``) and then the session
  (``session_cancelled``); no kernel of such a session has started.
- A started session ends with ``session_terminating``, per kernel
  ``kernel_terminating`` and ``kernel_terminated`` (interleaved), then
  ``session_terminated``; a batch session then says how its task ended:
  ``session_success`` (exit code 0) or ``session_failure`` (the failing exit code).
- A session is one kernel (single-node) or, for about one in five, a cluster: a main
  kernel and one to three sub kernels. As in the original, a kernel's ``cluster_idx``
  counts from 1 within its role (hostnames ``main1``, ``sub1``, ``sub2``, ...), so
  every session's main kernel is ``("main", 1)``.
- ``kernel_*`` events carry their kernel's id, role and index; ``session_*`` events
  concern no one kernel and carry none (empty id and role, index 0). Every event
  carries the session's name (``session_id``) and UUID (``session_uuid``).
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from ._pb.kernel_events.v1 import events_pb2 as pb


@dataclass(frozen=True)
class Tenant:
    user_id: str
    access_key: str
    domain: str
    groups: tuple[str, ...]


# Demo credentials the proxy prints at start-up: keep ids and keys stable.
DEFAULT_TENANTS: Final[tuple[Tenant, ...]] = (
    Tenant("demo-user-1", "AKDEMOUSER1", "default", ("g-alpha", "g-beta")),
    Tenant("demo-user-2", "AKDEMOUSER2", "default", ("g-beta",)),
    Tenant("demo-admin-1", "AKDEMOADMIN1", "default", ("g-alpha", "g-gamma")),
    Tenant("demo-super-1", "AKDEMOSUPER1", "default", ("g-alpha",)),
    Tenant("res-user-1", "AKRESUSER1", "research", ("r-genomics", "r-vision")),
    Tenant("res-user-2", "AKRESUSER2", "research", ("r-vision",)),
)

_WORDS: Final = (
    "amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor",
    "iris", "juniper", "kestrel", "lumen", "maple", "nova", "orbit", "pine",
    "quartz", "raven", "sierra", "tundra",
)  # fmt: skip
# Canonical image names (registry/project/name:tag), what kernel_pulling's reason says.
IMAGES: Final = (
    "cr.backend.ai/stable/python:3.9-ubuntu20.04",
    "cr.backend.ai/stable/python:3.11-ubuntu22.04",
    "cr.backend.ai/stable/python-pytorch:2.1-py310-cuda12.1",
    "cr.backend.ai/stable/python-tensorflow:2.13-py310-cuda11.8",
)
# Why a session still waiting in the queue was cancelled; a start that fails on the
# way says "failed-to-start".
_PENDING_CANCEL_REASONS: Final = ("pending-timeout", "user-requested", "resource-unavailable")
# Exit codes of a crashed batch job; 137 is what SIGKILL (e.g. the OOM killer) leaves.
_FAILURE_EXIT_CODES: Final = (1, 2, 137, 139)
# How a batch session's task ended, when it did not succeed: the event and its reason.
_FAILED: Final = ("session_failure", "task-failed")
MAIN_ROLE: Final = "main"
SUB_ROLE: Final = "sub"


class _Kernel(NamedTuple):
    kernel_id: str
    cluster_role: str
    cluster_idx: int


# What session_* events carry in the kernel fields: nothing.
_NO_KERNEL: Final = _Kernel("", "", 0)


class _Step(NamedTuple):
    name: str
    kernel: _Kernel = _NO_KERNEL
    reason: str | None = None
    result: pb.Result.ValueType = pb.RESULT_UNSPECIFIED
    exit_code: int | None = None


@dataclass
class _Session:
    session_id: str
    session_uuid: str
    tenant: Tenant
    group: str
    steps: deque[_Step]


def _cancellation(kernels: list[_Kernel], reason: str) -> list[_Step]:
    return [
        *(_Step("kernel_cancelled", k, reason) for k in kernels),
        _Step("session_cancelled", reason=reason),
    ]


class Simulator:
    """Yields one event at a time from up to ``max_live_sessions`` concurrent sessions."""

    def __init__(
        self,
        rng: random.Random,
        tenants: Sequence[Tenant] = DEFAULT_TENANTS,
        max_live_sessions: int = 20,
    ) -> None:
        if not tenants or any(not t.groups for t in tenants):
            raise ValueError("need at least one tenant, and every tenant needs a group")
        if max_live_sessions < 1:
            raise ValueError("max_live_sessions must be at least 1")
        self._rng = rng
        self._tenants = tuple(tenants)
        self._max_live = max_live_sessions
        self._live: list[_Session] = []
        self._started = 0

    def next_event(self) -> pb.LifecycleEvent:
        rng = self._rng
        # Starting becomes less likely as the pool fills, so the number of live
        # sessions settles below the cap instead of pinning to it.
        if not self._live or rng.random() >= len(self._live) / self._max_live:
            self._live.append(self._new_session())
            index = len(self._live) - 1
        else:
            index = rng.randrange(len(self._live))
        session = self._live[index]
        step = session.steps.popleft()
        if not session.steps:
            self._live[index] = self._live[-1]
            self._live.pop()
        kernel = step.kernel
        event = pb.LifecycleEvent(
            name=step.name,
            session_id=session.session_id,
            kernel_id=kernel.kernel_id,
            owner_access_key=session.tenant.access_key,
            user_id=session.tenant.user_id,
            domain_name=session.tenant.domain,
            group_name=session.group,
            result=step.result,
            session_uuid=session.session_uuid,
            cluster_role=kernel.cluster_role,
            cluster_idx=kernel.cluster_idx,
        )
        if step.reason is not None:
            event.reason = step.reason
        if step.exit_code is not None:
            event.exit_code = step.exit_code
        return event

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _new_session(self) -> _Session:
        rng = self._rng
        self._started += 1
        tenant = rng.choice(self._tenants)
        return _Session(
            session_id=f"sess-{rng.choice(_WORDS)}-{self._started}",
            session_uuid=self._uuid(),
            tenant=tenant,
            group=rng.choice(tenant.groups),
            steps=deque(self._script()),
        )

    def _kernels(self) -> list[_Kernel]:
        subs = self._rng.randint(1, 3) if self._rng.random() < 0.2 else 0
        return [_Kernel(self._uuid(), MAIN_ROLE, 1)] + [
            _Kernel(self._uuid(), SUB_ROLE, idx) for idx in range(1, subs + 1)
        ]

    def _interleave(self, per_kernel: list[list[_Step]]) -> list[_Step]:
        """The kernels' steps merged at random, each kernel's kept in its order."""
        queues = [deque(steps) for steps in per_kernel if steps]
        merged: list[_Step] = []
        while queues:
            i = self._rng.randrange(len(queues))
            merged.append(queues[i].popleft())
            if not queues[i]:
                queues.pop(i)
        return merged

    def _script(self) -> list[_Step]:
        rng = self._rng
        kernels = self._kernels()
        steps = [_Step("session_enqueued")]
        if rng.random() < 0.05:
            return steps + _cancellation(kernels, rng.choice(_PENDING_CANCEL_REASONS))
        steps.append(_Step("session_scheduled"))
        image = rng.choice(IMAGES)
        starts = []
        for k in kernels:
            start = [_Step("kernel_preparing", k)]
            if rng.random() < 0.4:  # otherwise the image is already cached on the agent
                start.append(_Step("kernel_pulling", k, image))
            start += [_Step("kernel_creating", k), _Step("kernel_started", k)]
            starts.append(start)
        if rng.random() < 0.05:
            # One kernel fails while being created; the others had got somewhere short
            # of starting. Then every kernel is cancelled, and the session.
            failing = rng.randrange(len(kernels))
            for i, start in enumerate(starts):
                starts[i] = start[: len(start) - 1 if i == failing else rng.randrange(len(start))]
            return steps + self._interleave(starts) + _cancellation(kernels, "failed-to-start")
        steps += self._interleave(starts)
        steps.append(_Step("session_started"))
        steps += self._termination(kernels)
        return steps

    def _termination(self, kernels: list[_Kernel]) -> list[_Step]:
        rng = self._rng
        batch = rng.random() < 0.4
        code: int | None
        if batch:
            # Batch jobs end on their own: the exit code decides the result.
            reason = "self-terminated"
            code = 0 if rng.random() < 0.8 else rng.choice(_FAILURE_EXIT_CODES)
            result = pb.RESULT_SUCCESS if code == 0 else pb.RESULT_FAILURE
            stopping = code
        else:
            # Interactive sessions are stopped from outside; whether they "succeeded"
            # is unknowable, except when a forced kill leaves a failure behind. Their
            # kernels have not exited yet when they are told to stop.
            reason = rng.choices(
                ("user-requested", "idle-timeout", "force-terminated"), weights=(6, 3, 1)
            )[0]
            forced = reason == "force-terminated"
            code = 137 if forced else None
            result = pb.RESULT_FAILURE if forced else pb.RESULT_UNDEFINED
            stopping = None
        steps = [_Step("session_terminating", reason=reason)]
        steps += self._interleave(
            [
                [
                    _Step("kernel_terminating", k, reason, exit_code=stopping),
                    _Step("kernel_terminated", k, reason, result, code),
                ]
                for k in kernels
            ]
        )
        steps.append(_Step("session_terminated", reason=reason, result=result))
        if batch:
            ending, why = ("session_success", "task-finished") if code == 0 else _FAILED
            steps.append(_Step(ending, reason=why, result=result, exit_code=code))
        return steps
