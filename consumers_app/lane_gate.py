"""When a worker's lane may take a batch: one lane at a time, unless the running batches are slow.

Every batch costs a worker the same whatever its size (two thread hops, a transaction, a
confirmed publish, an ack, a log line). Lanes that each take whatever is waiting split the queue
into small batches that each pay it: on the echo benchmark, four lanes made batches of ~30
frames and spent ~1.8x the worker CPU per frame of one lane (batches of ~100), on a machine
where that CPU was what every process was short of. Lanes exist so that a slow handler does not
hold up the frames behind it; so a second lane starts only once every running batch has run for
`slow_after` seconds. Under load one lane takes all that waits, in large batches; a slow batch
still gets company after that delay.
"""

import asyncio
import contextlib
import itertools

# Shortest wait for a running batch to turn slow (floating-point remainders of the delay).
MIN_WAIT_SECONDS = 0.001


class LaneGate:
    def __init__(self, slow_after: float) -> None:
        self.slow_after = slow_after
        # Each turn held, and when its batch started (None: its lane is still waiting for frames).
        self._held: dict[int, float | None] = {}
        self._turns = itertools.count()
        self._changed = asyncio.Event()

    async def take_turn(self) -> int:
        """Wait until this lane may take a batch; its turn, to give back with `done`."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            starts = list(self._held.values())
            if all(start is not None and now - start >= self.slow_after for start in starts):
                turn = next(self._turns)
                self._held[turn] = None
                return turn
            self._changed.clear()
            timeout = None  # a lane waits for frames: nothing runs that could turn slow
            if None not in starts:
                youngest = max(start for start in starts if start is not None)
                timeout = max(youngest + self.slow_after - now, MIN_WAIT_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def started(self, turn: int) -> None:
        """The lane holding `turn` has its batch and starts it (its time to turn slow runs)."""
        self._held[turn] = asyncio.get_running_loop().time()
        self._changed.set()

    def done(self, turn: int) -> None:
        self._held.pop(turn, None)
        self._changed.set()

    @property
    def running(self) -> int:
        """Batches running now."""
        return sum(1 for start in self._held.values() if start is not None)
