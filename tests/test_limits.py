"""Abuse limits (proxy/limits.py) with a fake clock: token buckets, stream slots, and
which address a request comes from."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import ConfigError, settings_from_mapping
from proxy.limits import (
    STREAM_RETRY_AFTER,
    Ledger,
    RateLimiter,
    StreamLimitExceeded,
    StreamSlots,
    client_address,
    parse_networks,
    retry_after_header,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(
    burst: int = 3, window: float = 60.0, max_keys: int = 1000
) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(burst, window, clock=clock, max_keys=max_keys), clock


# --- RateLimiter ------------------------------------------------------------------------


def test_a_burst_is_allowed_then_refused_with_the_time_to_wait() -> None:
    rl, _ = limiter(burst=3, window=60)
    for _ in range(3):
        assert rl.retry_after("1.2.3.4") == 0.0
        rl.take("1.2.3.4")
    # One token comes back every window / burst = 20 s.
    assert rl.retry_after("1.2.3.4") == pytest.approx(20.0)


def test_tokens_come_back_with_time() -> None:
    rl, clock = limiter(burst=3, window=60)
    for _ in range(3):
        rl.take("a")
    clock.now += 19.9
    assert rl.retry_after("a") == pytest.approx(0.1)
    clock.now += 0.1
    assert rl.retry_after("a") == 0.0
    rl.take("a")
    assert rl.retry_after("a") == pytest.approx(20.0)
    clock.now += 600  # never more than the burst
    for _ in range(3):
        assert rl.retry_after("a") == 0.0
        rl.take("a")
    assert rl.retry_after("a") > 0


def test_one_key_exhausted_leaves_the_others_alone() -> None:
    rl, _ = limiter(burst=2)
    for _ in range(10):
        rl.take("attacker")
    assert rl.retry_after("attacker") > 0
    assert rl.retry_after("victim") == 0.0


def test_hammering_an_empty_bucket_does_not_dig_deeper() -> None:
    rl, clock = limiter(burst=1, window=10)
    for _ in range(1000):
        rl.take("a")
    clock.now += 10
    assert rl.retry_after("a") == 0.0


def test_a_clock_going_backwards_never_adds_tokens() -> None:
    rl, clock = limiter(burst=1, window=10)
    rl.take("a")
    clock.now -= 1000
    assert rl.retry_after("a") == pytest.approx(10.0)


def test_memory_is_bounded_whatever_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    rl, clock = limiter(burst=1, window=10, max_keys=100)
    scans = 0
    prune = rl._prune

    def counting(now: float) -> None:
        nonlocal scans
        scans += 1
        prune(now)

    monkeypatch.setattr(rl, "_prune", counting)
    for i in range(10_000):
        rl.take(f"key-{i}")
        clock.now += 0.001
    assert len(rl) <= 100
    # The most recent keys are the ones still remembered.
    assert rl.retry_after("key-9999") > 0
    # Pruning is amortised: one scan per ~10% of the bound in new keys, not one per key.
    assert scans <= 10_000 // 10 + 1


def test_refilled_buckets_are_forgotten_first() -> None:
    rl, clock = limiter(burst=1, window=1, max_keys=10)
    rl.take("old")
    clock.now += 5  # "old" has refilled: it is no different from a new key
    for i in range(10):
        rl.take(f"busy-{i}")
    # Over the bound: the refilled bucket goes, then the least recently used, to 90%.
    assert "old" not in rl._buckets
    assert sorted(rl._buckets) == [f"busy-{i}" for i in range(1, 10)]


@given(
    burst=st.integers(1, 20),
    window=st.floats(0.1, 1000),
    steps=st.lists(st.tuples(st.floats(0, 100), st.booleans()), max_size=60),
)
def test_never_more_than_burst_plus_refill_attempts(
    burst: int, window: float, steps: list[tuple[float, bool]]
) -> None:
    """Over any schedule, the attempts let through are at most burst + rate * elapsed."""
    rl, clock = limiter(burst=burst, window=window)
    start, allowed = clock.now, 0
    for dt, attempt in steps:
        clock.now += dt
        if attempt and rl.retry_after("k") == 0.0:
            allowed += 1
            rl.take("k")
    assert allowed <= burst + (clock.now - start) * burst / window + 1e-6


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RateLimiter(0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(1, 0.0)


@pytest.mark.parametrize(("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (19.01, "20")])
def test_retry_after_is_whole_seconds_rounded_up(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


# --- StreamSlots ------------------------------------------------------------------------


def test_per_key_cap_is_429_and_others_still_get_in() -> None:
    slots = StreamSlots(per_key=2, total=10)
    slots.acquire("AK1")
    slots.acquire("AK1")
    with pytest.raises(StreamLimitExceeded) as info:
        slots.acquire("AK1")
    assert (info.value.status, info.value.error) == (429, "too-many-streams")
    assert info.value.retry_after == STREAM_RETRY_AFTER
    assert "max_streams_per_key" in info.value.detail
    slots.acquire("AK2")
    assert (slots.count("AK1"), slots.count("AK2"), slots.held) == (2, 1, 3)


def test_total_cap_is_503() -> None:
    slots = StreamSlots(per_key=10, total=2)
    slots.acquire("AK1")
    slots.acquire("AK2")
    with pytest.raises(StreamLimitExceeded) as info:
        slots.acquire("AK3")
    assert (info.value.status, info.value.error) == (503, "server-busy")
    assert slots.refused == {"server-busy": 1}


def test_released_slots_can_be_taken_again_and_leave_nothing_behind() -> None:
    slots = StreamSlots(per_key=1, total=1)
    for i in range(1000):
        slots.acquire(f"minted-{i}")  # e.g. JWT subjects: any number of keys
        slots.release(f"minted-{i}")
    assert slots.held == 0
    assert slots.count("minted-0") == 0
    assert not slots._by_key  # no zero entries accumulate


def test_a_refusal_takes_no_slot() -> None:
    slots = StreamSlots(per_key=1, total=5)
    slots.acquire("AK1")
    for _ in range(10):
        with pytest.raises(StreamLimitExceeded):
            slots.acquire("AK1")
    assert slots.held == 1
    slots.release("AK1")
    slots.acquire("AK1")


# --- Ledger (one process's, or a whole group's, held by its supervisor) ------------------


def ledger(per_key: int = 2, total: int = 3, attempts: int = 2, failures: int = 2) -> Ledger:
    return Ledger(
        max_streams_per_key=per_key,
        max_streams=total,
        login_attempts_per_address=attempts,
        login_failures_per_key=failures,
        login_window=60.0,
        clock=Clock(),
    )


def test_caps_hold_for_the_group_whichever_worker_asks() -> None:
    accounts = ledger(per_key=2, total=3)
    accounts.acquire("AK1", holder=1)
    accounts.acquire("AK1", holder=2)
    with pytest.raises(StreamLimitExceeded) as info:
        accounts.acquire("AK1", holder=1)
    assert info.value.error == "too-many-streams"
    accounts.acquire("AK2", holder=2)
    with pytest.raises(StreamLimitExceeded) as info:
        accounts.acquire("AK3", holder=1)
    assert info.value.error == "server-busy"
    assert accounts.slots.held == 3


def test_a_dead_workers_slots_all_come_back_and_only_its() -> None:
    accounts = ledger(per_key=5, total=10)
    for key in ("AK1", "AK1", "AK2"):
        accounts.acquire(key, holder=1)
    accounts.acquire("AK1", holder=2)
    assert accounts.forget(1) == 3
    assert (accounts.slots.count("AK1"), accounts.slots.count("AK2")) == (1, 0)
    assert accounts.forget(1) == 0
    # A late release from the dead worker gives back nothing it no longer holds.
    accounts.release("AK1", holder=1)
    assert accounts.slots.count("AK1") == 1
    accounts.release("AK1", holder=2)
    assert accounts.slots.held == 0


def test_a_release_never_frees_another_holders_slot() -> None:
    accounts = ledger(per_key=1, total=5)
    accounts.acquire("AK1", holder=1)
    accounts.release("AK1", holder=2)
    with pytest.raises(StreamLimitExceeded):
        accounts.acquire("AK1", holder=2)


def test_login_buckets_count_attempts_then_say_how_long_to_wait() -> None:
    accounts = ledger(attempts=2, failures=1)
    assert accounts.login_attempt("10.0.0.1") == 0.0
    assert accounts.login_attempt("10.0.0.1") == 0.0
    assert accounts.login_attempt("10.0.0.1") == pytest.approx(30.0)
    assert accounts.login_attempt("10.0.0.2") == 0.0
    assert accounts.login_wait("AK1") == 0.0
    accounts.login_failed("AK1")
    assert accounts.login_wait("AK1") == pytest.approx(60.0)


# --- client_address -----------------------------------------------------------------------

PROXIES = parse_networks(["10.0.0.0/8", "::1"])


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert client_address("203.0.113.9", ["1.2.3.4"], ()) == "203.0.113.9"


def test_an_untrusted_peer_cannot_choose_its_address() -> None:
    assert client_address("203.0.113.9", ["1.2.3.4"], PROXIES) == "203.0.113.9"


def test_behind_a_trusted_proxy_the_client_is_the_rightmost_untrusted_hop() -> None:
    # The client wrote "6.6.6.6" itself; nginx appended the real peer it saw.
    assert client_address("10.0.0.2", ["6.6.6.6, 198.51.100.7"], PROXIES) == "198.51.100.7"
    # Two proxies in a row, in two header lines.
    assert client_address("10.0.0.2", ["198.51.100.7", "10.0.0.5"], PROXIES) == "198.51.100.7"


def test_a_trusted_proxy_without_the_header_is_the_client() -> None:
    assert client_address("::1", [], PROXIES) == "::1"
    assert client_address("10.1.1.1", ["10.0.0.3"], PROXIES) == "10.0.0.3"


def test_garbage_in_the_header_is_a_bounded_opaque_address() -> None:
    got = client_address("10.0.0.2", ["x" * 1000], PROXIES)
    assert got == "x" * 64
    assert client_address(None, [], ()) == "unknown"


# --- Settings ---------------------------------------------------------------------------


def test_limits_settings_defaults_and_validation() -> None:
    settings = settings_from_mapping({})
    assert settings.limits.max_streams_per_key == 100
    assert settings.limits.trusted_proxies == ()
    got = settings_from_mapping({"limits": {"trusted_proxies": ["10.0.0.1/8", "::1"]}})
    assert got.limits.trusted_proxies == ("10.0.0.0/8", "::1/128")
    with pytest.raises(ConfigError, match=r"limits\.trusted_proxies\.0"):
        settings_from_mapping({"limits": {"trusted_proxies": ["nginx"]}})
    with pytest.raises(ConfigError, match=r"limits\.max_stream: unknown key"):
        settings_from_mapping({"limits": {"max_stream": 1}})
    with pytest.raises(ConfigError, match=r"limits\.max_streams_per_key"):
        settings_from_mapping({"limits": {"max_streams_per_key": 0}})
