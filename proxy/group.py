"""What the app asks of its process: stream slots, login buckets, ``/metrics``,
``/healthz`` and ``/readyz`` (``Shared``), a process's own when it serves alone
(``SingleProcess``)."""

from __future__ import annotations

from typing import Any, Protocol

from .config import LimitsSettings
from .limits import Ledger
from .metrics import Metrics
from .upstream import UpstreamBridge

Message = dict[str, Any]


class Shared(Protocol):
    """What admission, login and the operational routes ask of their process or group."""

    async def acquire_stream(self, key: str) -> None:
        """Take a stream slot for ``key``, or raise ``limits.StreamLimitExceeded``."""

    def release_stream(self, key: str) -> None: ...

    async def login_attempt(self, address: str) -> float:
        """Count a login attempt from ``address``, or the seconds it must wait first."""

    async def login_wait(self, access_key: str) -> float: ...

    def login_failed(self, access_key: str) -> None: ...

    async def metrics(self) -> bytes:
        """Prometheus text for the process or the whole group."""

    async def health(self) -> tuple[int, Message]: ...

    async def readiness(self) -> tuple[int, Message]: ...


def ledger_for(limits: LimitsSettings) -> Ledger:
    return Ledger(
        max_streams_per_key=limits.max_streams_per_key,
        max_streams=limits.max_streams,
        login_attempts_per_address=limits.login_attempts_per_address,
        login_failures_per_key=limits.login_failures_per_key,
        login_window=limits.login_window,
    )


def readiness(live: bool, workers: Message | None = None) -> tuple[int, Message]:
    """``/readyz``: 200 while the upstream stream is live."""
    body: Message = {"status": "ready" if live else "upstream-unavailable", "upstream": live}
    if workers is not None:
        body["workers"] = workers
    return (200 if live else 503), body


class SingleProcess:
    """A process serving alone: its own ledger, metrics and upstream bridge."""

    def __init__(self, limits: LimitsSettings, metrics: Metrics, bridge: UpstreamBridge) -> None:
        self.ledger = ledger_for(limits)
        self._metrics = metrics
        self._bridge = bridge

    async def acquire_stream(self, key: str) -> None:
        # No checkpoint: taken synchronously, so a burst cannot overshoot a cap.
        self.ledger.acquire(key)

    def release_stream(self, key: str) -> None:
        self.ledger.release(key)

    async def login_attempt(self, address: str) -> float:
        return self.ledger.login_attempt(address)

    async def login_wait(self, access_key: str) -> float:
        return self.ledger.login_wait(access_key)

    def login_failed(self, access_key: str) -> None:
        self.ledger.login_failed(access_key)

    async def metrics(self) -> bytes:
        return self._metrics.render()

    async def health(self) -> tuple[int, Message]:
        return 200, {"status": "ok"}

    async def readiness(self) -> tuple[int, Message]:
        return readiness(self._bridge.live)
