"""The pacer (pacing.py): at most ``per_batch`` tasks pass per scheduler batch, in
the order they arrived; without its runner everyone passes at once; nothing is held."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from proxy.pacing import Pacer


class Batches(trio.abc.Instrument):
    """Numbers Trio's scheduler batches (one per pass of its run loop)."""

    def __init__(self) -> None:
        self.batch = 0

    def after_io_wait(self, timeout: float) -> None:
        self.batch += 1


def test_per_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Pacer(0)


async def test_without_its_runner_everyone_passes_at_once_without_a_checkpoint() -> None:
    pacer = Pacer(2)
    with trio.testing.assert_no_checkpoints():
        for _ in range(10):
            await pacer.turn()
    assert pacer.waited == 0


async def test_at_most_per_batch_pass_per_batch_in_arrival_order() -> None:
    batches = Batches()
    trio.lowlevel.add_instrument(batches)
    pacer, arrived, passed = Pacer(5), list[int](), list[tuple[int, int]]()

    async def one(i: int) -> None:
        arrived.append(i)
        await pacer.turn()
        passed.append((i, batches.batch))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pacer.run)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as crowd:
                for i in range(53):
                    crowd.start_soon(one, i)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(batches)
    assert sorted(i for i, _ in passed) == list(range(53))
    per_batch: dict[int, int] = {}
    for _, batch in passed:
        per_batch[batch] = per_batch.get(batch, 0) + 1
    assert max(per_batch.values()) <= 5
    assert len(per_batch) >= 11  # 53 at 5 a batch
    # First come, first served: a later arrival never passes in an earlier batch (within
    # a batch Trio runs tasks in an order of its own).
    batch_of = dict(passed)
    in_arrival_order = [batch_of[i] for i in arrived]
    assert in_arrival_order == sorted(in_arrival_order)
    assert pacer.waited == 48
    assert pacer.waiting == 0


async def through(pacer: Pacer, name: object, passed: list[object]) -> None:
    await pacer.turn()
    passed.append(name)


async def test_a_cancelled_waiter_leaves_the_queue_and_the_rest_go_on() -> None:
    pacer = Pacer(1)
    passed: list[object] = []

    async with trio.open_nursery() as nursery:
        await trio.testing.wait_all_tasks_blocked()
        await pacer.turn()  # not running yet: passes (and uses up the batch's one pass)
        nursery.start_soon(pacer.run)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as doomed:
            doomed.cancel()
            await pacer.turn()  # waits, and is cancelled
        assert doomed.cancelled_caught
        assert pacer.waiting == 0
        nursery.start_soon(through, pacer, "after", passed)
        await trio.testing.wait_all_tasks_blocked()
        assert passed == ["after"]
        assert pacer.waiting == 0
        nursery.cancel_scope.cancel()


async def test_when_the_runner_stops_the_waiting_are_let_through() -> None:
    pacer = Pacer(1)
    passed: list[object] = []

    async with trio.open_nursery() as outer, trio.open_nursery() as runner:
        runner.start_soon(pacer.run)
        await trio.testing.wait_all_tasks_blocked()
        pacer._passed = pacer.per_batch  # this batch's pass is used up
        for i in range(3):
            outer.start_soon(through, pacer, i, passed)
        await trio.lowlevel.checkpoint()
        runner.cancel_scope.cancel()
    assert len(passed) == 3
    assert set(passed) == {0, 1, 2}
    await pacer.turn()  # not running: passes at once
