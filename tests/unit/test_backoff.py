"""notifications/backoff.py: capped, jittered exponential backoff that stops when told."""

import asyncio
import time

import pytest

from notifications import backoff
from notifications.backoff import Backoff, Stopped


@pytest.fixture
def no_jitter(monkeypatch):
    monkeypatch.setattr(backoff.random, "uniform", lambda low, high: 1.0)


def test_delays_double_up_to_the_maximum(no_jitter):
    waits = Backoff(4.0, first=0.5)
    assert [waits.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_the_default_first_delay(no_jitter):
    assert Backoff(15.0).next_delay() == backoff.FIRST_DELAY


def test_a_maximum_below_the_first_delay_caps_from_the_second_on(no_jitter):
    waits = Backoff(0.2, first=0.5)
    assert [waits.next_delay() for _ in range(3)] == [0.5, 0.2, 0.2]


def test_jitter_stays_within_20_percent():
    seen = []
    for _ in range(200):
        waits = Backoff(8.0, first=1.0)
        for nominal in (1.0, 2.0, 4.0, 8.0, 8.0):
            delay = waits.next_delay()
            assert 0.8 * nominal <= delay <= 1.2 * nominal
            seen.append(delay / nominal)
    # Jittered indeed: not one fixed factor.
    assert max(seen) - min(seen) > 0.2


def test_reset_starts_again_from_the_first_delay(no_jitter):
    waits = Backoff(10.0, first=0.5)
    for _ in range(5):
        waits.next_delay()
    waits.reset()
    assert [waits.next_delay() for _ in range(2)] == [0.5, 1.0]


async def test_wait_raises_stopped_at_once_when_stop_is_set():
    stop = asyncio.Event()
    stop.set()
    started = time.monotonic()
    with pytest.raises(Stopped):
        await Backoff(60.0, first=30.0).wait(stop)
    assert time.monotonic() - started < 0.5


async def test_wait_raises_stopped_as_soon_as_stop_is_set_meanwhile():
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    started = time.monotonic()
    with pytest.raises(Stopped):
        await Backoff(60.0, first=30.0).wait(stop)
    assert time.monotonic() - started < 1.0


async def test_wait_returns_the_delay_it_waited(no_jitter):
    stop = asyncio.Event()
    waits = Backoff(1.0, first=0.01)
    started = time.monotonic()
    assert await waits.wait(stop) == 0.01
    assert await waits.wait() == 0.02
    assert time.monotonic() - started >= 0.03
    assert not stop.is_set()
