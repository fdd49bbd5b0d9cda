"""Abuse limits as pure bookkeeping: login rate limits, stream admission, who a client is.

No I/O and no clock of its own (a clock is passed in), so every rule is unit-tested
with a fake clock (``tests/test_limits.py``); ``app.py`` and ``web.py`` apply them.

- ``RateLimiter``: token buckets keyed by a string (a client address, an access key).
  A bucket holds up to ``burst`` tokens and refills at ``burst`` per ``window``
  seconds; an attempt takes one. Buckets that have refilled are forgotten, and the
  number kept is bounded, so an attacker cycling through keys cannot grow memory.
- ``StreamSlots``: how many event streams each access key, and the whole process,
  holds. A slot is taken when a stream is admitted (synchronously, so a burst of
  simultaneous requests cannot all pass the check before any of them subscribes) and
  given back when its request ends.
- ``Ledger``: both, as one process or a whole group of workers holds them. In a group
  (``serve --workers N``) the supervisor keeps the one ledger and answers each worker's
  questions; it also knows which worker holds which slot, so a worker that dies gives
  all of its slots back at once (``forget``).
- ``client_address``: the peer address, or, behind a configured trusted reverse proxy,
  the nearest address in ``X-Forwarded-For`` that the proxies did not add themselves.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Final

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What a client refused a stream is told to wait: one of its streams may end by then.
STREAM_RETRY_AFTER: Final = 5
# Bound on the buckets a limiter keeps (each is a few dozen bytes).
MAX_TRACKED_KEYS: Final = 100_000
_MAX_ADDRESS_LENGTH: Final = 64


class RateLimiter:
    """Token buckets: ``burst`` attempts at once, refilling at ``burst`` per ``window``."""

    def __init__(
        self,
        burst: int,
        window: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_TRACKED_KEYS,
    ) -> None:
        if burst < 1 or window <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be at least 1, window positive")
        self.burst = burst
        self.window = window
        self._rate = burst / window  # tokens per second
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, when counted); insertion order is least recently used first.
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.burst)
        tokens, stamp = entry
        return min(float(self.burst), tokens + max(0.0, now - stamp) * self._rate)

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again: 0.0 when it may now."""
        tokens = self._tokens(key, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def take(self, key: str) -> None:
        """Count one attempt (an empty bucket stays empty: it never goes negative)."""
        now = self._clock()
        tokens = max(0.0, self._tokens(key, now) - 1.0)
        self._buckets.pop(key, None)
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._prune(now)

    def _prune(self, now: float) -> None:
        # Down to 90% of the bound, so the scan's cost is shared by the next 10% of new
        # keys instead of being paid on every attempt of an attacker cycling keys.
        target = self._max_keys * 9 // 10
        # A full bucket is the same as no bucket: forget those first.
        full = [k for k in self._buckets if self._tokens(k, now) >= self.burst]
        for key in full:
            del self._buckets[key]
        # Still too many: forget the least recently used (that only ever forgives).
        excess = len(self._buckets) - target
        if excess > 0:
            for key in list(self._buckets)[:excess]:
                del self._buckets[key]


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


class StreamLimitExceeded(Exception):
    """A stream refused at a cap; ``status``, ``error`` and ``detail`` for the answer."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
        self.retry_after = STREAM_RETRY_AFTER


class StreamSlots:
    """Streams held per access key and in total, against their caps."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = per_key
        self.total = total
        self.held = 0
        self._by_key: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # by error code, for the metrics

    def count(self, key: str) -> int:
        return self._by_key.get(key, 0)

    def acquire(self, key: str) -> None:
        """Take a slot for ``key`` or raise ``StreamLimitExceeded`` (429 / 503)."""
        if self._by_key.get(key, 0) >= self.per_key:
            self.refused["too-many-streams"] += 1
            raise StreamLimitExceeded(
                429,
                "too-many-streams",
                f"this access key already has {self.per_key} open streams "
                "(limits.max_streams_per_key): close one first",
            )
        if self.held >= self.total:
            self.refused["server-busy"] += 1
            raise StreamLimitExceeded(
                503,
                "server-busy",
                f"this server holds its maximum of {self.total} streams "
                "(limits.max_streams): try again later",
            )
        self._by_key[key] += 1
        self.held += 1

    def release(self, key: str) -> None:
        left = self._by_key[key] - 1
        if left > 0:
            self._by_key[key] = left
        else:
            # No zero entries: keys minted by token holders must not accumulate.
            del self._by_key[key]
        self.held -= 1


class Ledger:
    """Stream slots and login buckets, for one process or a whole group of workers.

    ``holder`` says which worker took a slot (0 in a process of its own). Each answer
    is decided at once, in one place, so a burst spread over several workers cannot
    slip past a cap either.
    """

    def __init__(
        self,
        *,
        max_streams_per_key: int,
        max_streams: int,
        login_attempts_per_address: int,
        login_failures_per_key: int,
        login_window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = StreamSlots(max_streams_per_key, max_streams)
        self.per_address = RateLimiter(login_attempts_per_address, login_window, clock=clock)
        self.per_key = RateLimiter(login_failures_per_key, login_window, clock=clock)
        self._held: dict[int, Counter[str]] = {}

    def acquire(self, key: str, holder: int = 0) -> None:
        """A stream slot for ``key``, or ``StreamLimitExceeded``."""
        self.slots.acquire(key)
        self._held.setdefault(holder, Counter())[key] += 1

    def release(self, key: str, holder: int = 0) -> None:
        held = self._held.get(holder)
        if held is None or held[key] <= 0:
            return  # not this holder's (it was forgotten): nothing to give back
        held[key] -= 1
        if not held[key]:
            del held[key]
        self.slots.release(key)

    def forget(self, holder: int) -> int:
        """Give back every slot ``holder`` holds (a worker died); how many there were."""
        held = self._held.pop(holder, Counter())
        for key, count in held.items():
            for _ in range(count):
                self.slots.release(key)
        return held.total()

    def login_attempt(self, address: str) -> float:
        """Count a login attempt from ``address``, or say how long it must wait first."""
        wait = self.per_address.retry_after(address)
        if not wait:
            self.per_address.take(address)
        return wait

    def login_wait(self, access_key: str) -> float:
        """How long logins for ``access_key`` must wait (0.0: they may go ahead)."""
        return self.per_key.retry_after(access_key)

    def login_failed(self, access_key: str) -> None:
        self.per_key.take(access_key)


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> str:
    """Who sent the request, for per-address limits.

    The peer itself unless it is a trusted proxy; then the rightmost address in
    ``X-Forwarded-For`` that is not a trusted proxy (anything left of it was written by
    the client and proves nothing). Without trusted proxies the header is ignored.
    """
    address = peer or "unknown"
    if not trusted or not _trusted(address, trusted):
        return address
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        address = hop[:_MAX_ADDRESS_LENGTH]
        if not _trusted(hop, trusted):
            break
    return address
