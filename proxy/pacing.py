"""A pacer: at most so many tasks pass per scheduler batch; the rest wait their turn.

Why. Trio runs every runnable task once per batch before it looks at the network
again. When thousands of clients leave at once (a load balancer drops a replica's
clients, a reconnect storm starts), every one of their connections wakes in the same
batch and ends in lockstep, several steps each: batches of 4,000 steps, 100 to 600 ms
apiece, during which the events for the clients that stay wait (docs/benchmarks.md).
Passing their endings through a pacer spreads the same work over many short batches,
and the publishing task gets its turn between them.

It only orders; it never holds anything. A task that passed owes the pacer nothing,
so a connection that never finishes cannot block the others, and with nobody waiting
a task passes at once, without a checkpoint.
"""

from __future__ import annotations

import trio


class Pacer:
    """Lets ``per_batch`` tasks through per scheduler batch while ``run`` runs (without
    it, everyone passes at once)."""

    def __init__(self, per_batch: int) -> None:
        if per_batch < 1:
            raise ValueError("per_batch must be at least 1")
        self.per_batch = per_batch
        self.waited = 0  # tasks that had to wait for a turn, since start
        self._lot = trio.lowlevel.ParkingLot()
        self._wake = trio.Event()
        self._passed = 0  # since the batch the runner last ran in (see run)
        self._running = False

    @property
    def waiting(self) -> int:
        return len(self._lot)

    async def turn(self) -> None:
        """Return when it is this task's turn: at once while this batch has room."""
        if self._running and (self._lot or self._passed >= self.per_batch):
            self.waited += 1
            self._wake.set()
            await self._lot.park()
            return
        self._passed += 1

    async def run(self) -> None:
        """Let the waiting through, ``per_batch`` per batch, until cancelled.

        ``_passed`` counts the tasks let through since this task last ran: reset when
        the queue empties, so a quiet hour's endings do not add up to a wait (at worst
        the ``per_batch``-th of them waits one batch).
        """
        self._running = True
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._lot:
                    self._passed = len(self._lot.unpark(count=self.per_batch))
                    await trio.lowlevel.checkpoint()
                self._passed = 0
        finally:
            self._running = False
            self._lot.unpark_all()
