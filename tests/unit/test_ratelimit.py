"""consumers_app/ratelimit.py: a socket's frames per second, burst twice that."""

from types import SimpleNamespace

import pytest

from consumers_app import ratelimit
from consumers_app.ratelimit import TokenBucket


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(value=1000.0)
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(monotonic=lambda: now.value))
    return now


def allowed(bucket: TokenBucket, tries: int) -> int:
    return sum(bucket.allow() for _ in range(tries))


def test_burst_is_twice_the_rate_then_refused(clock):
    bucket = TokenBucket(5)
    assert allowed(bucket, 30) == 10
    assert not bucket.allow()


def test_tokens_come_back_at_the_rate(clock):
    bucket = TokenBucket(5)
    assert allowed(bucket, 10) == 10
    clock.value += 0.1  # half a token
    assert not bucket.allow()
    clock.value += 0.1  # one token
    assert bucket.allow()
    assert not bucket.allow()
    clock.value += 1.0  # five tokens
    assert allowed(bucket, 20) == 5


def test_refill_is_capped_at_the_burst(clock):
    bucket = TokenBucket(5)
    assert allowed(bucket, 10) == 10
    clock.value += 3600
    assert allowed(bucket, 100) == 10


def test_an_explicit_burst(clock):
    bucket = TokenBucket(2, burst=3)
    assert allowed(bucket, 10) == 3
    clock.value += 0.5
    assert allowed(bucket, 10) == 1


def test_a_steady_sender_at_the_rate_is_never_refused(clock):
    bucket = TokenBucket(50)
    for _ in range(1000):
        clock.value += 1 / 50
        assert bucket.allow()
