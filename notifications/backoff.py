"""Capped, jittered exponential backoff, for every wait on a broker or database that is down."""

import asyncio
import random

FIRST_DELAY = 0.5


class Backoff:
    """Successive delays FIRST_DELAY, 2×, 4×, … up to `maximum`, each jittered by ±20 %.

    Jitter keeps many processes that lost the same broker from coming back in step.
    """

    def __init__(self, maximum: float, first: float = FIRST_DELAY) -> None:
        self.first = first
        self.maximum = maximum
        self.delay = first

    def next_delay(self) -> float:
        delay = self.delay
        self.delay = min(self.maximum, self.delay * 2)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self, stop: asyncio.Event | None = None) -> float:
        """Sleep for the next delay; return it. With `stop`, raise Stopped as soon as it is set."""
        delay = self.next_delay()
        if stop is None:
            await asyncio.sleep(delay)
            return delay
        if stop.is_set():
            raise Stopped()
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            return delay
        raise Stopped()


class Stopped(Exception):
    """The process is stopping while it waited out an outage."""
