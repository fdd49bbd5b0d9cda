"""A deterministic, plausible kernel lifecycle generator for demos and tests.

Pure: no clock, no I/O. It owns the demo tenants and the shape of a session's life;
the caller owns sequences (the log assigns them) and timestamps (stamped on write).
Each session's whole script is decided when it starts, so its events can only come
out in lifecycle order however the sessions interleave.
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
_CANCEL_REASONS: Final = ("resource-unavailable", "quota-exceeded", "user-requested")
# Exit codes of a crashed batch job; 137 is what SIGKILL (e.g. the OOM killer) leaves.
_FAILURE_EXIT_CODES: Final = (1, 2, 137, 139)


class _Step(NamedTuple):
    name: str
    reason: str | None = None
    result: pb.Result.ValueType = pb.RESULT_UNSPECIFIED
    exit_code: int | None = None


@dataclass
class _Session:
    session_id: str
    kernel_id: str
    tenant: Tenant
    group: str
    steps: deque[_Step]


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
        event = pb.LifecycleEvent(
            name=step.name,
            session_id=session.session_id,
            kernel_id=session.kernel_id,
            owner_access_key=session.tenant.access_key,
            user_id=session.tenant.user_id,
            domain_name=session.tenant.domain,
            group_name=session.group,
            result=step.result,
        )
        if step.reason is not None:
            event.reason = step.reason
        if step.exit_code is not None:
            event.exit_code = step.exit_code
        return event

    def _new_session(self) -> _Session:
        rng = self._rng
        self._started += 1
        tenant = rng.choice(self._tenants)
        return _Session(
            session_id=f"sess-{rng.choice(_WORDS)}-{self._started}",
            kernel_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            tenant=tenant,
            group=rng.choice(tenant.groups),
            steps=deque(self._script()),
        )

    def _script(self) -> list[_Step]:
        rng = self._rng
        steps: list[_Step] = []
        # Sessions the scheduler places at once never show up as enqueued.
        if rng.random() < 0.85:
            steps.append(_Step("kernel_enqueued"))
            if rng.random() < 0.07:
                steps.append(_Step("kernel_cancelled", rng.choice(_CANCEL_REASONS)))
                return steps
        steps.append(_Step("kernel_preparing", "scheduled"))
        if rng.random() < 0.4:  # otherwise the image is already cached on the agent
            steps.append(_Step("kernel_pulling", "image-pull"))
        steps.append(_Step("kernel_creating"))
        if rng.random() < 0.05:
            steps.append(
                _Step("kernel_terminated", "failed-to-start", pb.RESULT_FAILURE, 1),
            )
            return steps
        steps.append(_Step("kernel_started"))
        if rng.random() < 0.4:
            # Batch jobs end on their own: the exit code decides the result.
            if rng.random() < 0.8:
                steps.append(_Step("kernel_terminated", "self-terminated", pb.RESULT_SUCCESS, 0))
            else:
                code = rng.choice(_FAILURE_EXIT_CODES)
                steps.append(_Step("kernel_terminated", "self-terminated", pb.RESULT_FAILURE, code))
            return steps
        # Interactive sessions are stopped from outside; whether they "succeeded" is
        # unknowable, except when a forced kill leaves a failure behind.
        reason = rng.choices(
            ("user-requested", "idle-timeout", "force-terminated"), weights=(6, 3, 1)
        )[0]
        steps.append(_Step("kernel_terminating", reason))
        if reason == "force-terminated":
            steps.append(_Step("kernel_terminated", reason, pb.RESULT_FAILURE, 137))
        else:
            steps.append(_Step("kernel_terminated", reason, pb.RESULT_UNDEFINED))
        return steps
