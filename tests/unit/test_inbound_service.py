"""notifications/services/inbound.py: a worker's attempt outcome, in memory (no database)."""

from datetime import UTC, datetime

import pytest

from notifications.models import ERROR_MAX_CHARS, InboundFrame, clip_error
from notifications.services.inbound import (
    Failure,
    attempt_failed,
    attempt_succeeded,
    retry_delay,
    start_attempt,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(autouse=True)
def retry_settings(settings):
    settings.RT_INBOUND_RETRY_DELAYS = [1, 2, 4, 8]
    settings.RT_INBOUND_MAX_ATTEMPTS = 5


@pytest.mark.parametrize("attempts, delay", [(1, 1), (2, 2), (3, 4), (4, 8), (5, 8), (9, 8), (100, 8)])
def test_retry_delay_follows_the_list_and_repeats_the_last(attempts, delay):
    assert retry_delay(attempts) == delay


def test_retry_delay_reads_the_setting(settings):
    settings.RT_INBOUND_RETRY_DELAYS = [3, 30]
    assert [retry_delay(n) for n in (1, 2, 3)] == [3, 30, 30]


@pytest.mark.parametrize("attempts, delay", [(1, 1), (2, 2), (3, 4), (4, 8)])
def test_a_failed_attempt_before_the_limit_is_retried_with_its_delay(attempts, delay):
    frame = InboundFrame(attempts=attempts, status=InboundFrame.Status.ACCEPTED)
    failure = attempt_failed(frame, ValueError("boom"), NOW)
    assert failure == Failure(dead=False, retry_in=delay)
    assert frame.status == InboundFrame.Status.FAILED
    assert frame.error == "ValueError: boom"
    assert frame.processed_at is None


@pytest.mark.parametrize("attempts", [5, 6, 50])
def test_a_failed_attempt_at_the_limit_is_dead(attempts):
    frame = InboundFrame(attempts=attempts, status=InboundFrame.Status.FAILED)
    failure = attempt_failed(frame, RuntimeError("still broken"), NOW)
    assert failure.dead is True
    assert frame.status == InboundFrame.Status.DEAD
    assert frame.processed_at == NOW
    assert frame.error == "RuntimeError: still broken"


def test_the_limit_reads_the_setting(settings):
    settings.RT_INBOUND_MAX_ATTEMPTS = 2
    assert attempt_failed(InboundFrame(attempts=1), ValueError(), NOW).dead is False
    assert attempt_failed(InboundFrame(attempts=2), ValueError(), NOW).dead is True


def test_a_huge_error_is_clipped_on_the_record():
    frame = InboundFrame(attempts=1)
    attempt_failed(frame, ValueError("x" * 10_000), NOW)
    assert len(frame.error) == ERROR_MAX_CHARS
    assert frame.error.startswith("ValueError: xxx")


def test_start_attempt_counts_redeliveries_that_died_with_their_worker():
    frame = InboundFrame(attempts=1)
    start_attempt(frame, "worker-7", redeliveries=2)
    assert frame.attempts == 4
    assert frame.processed_by == "worker-7"


def test_a_success_clears_the_last_error():
    frame = InboundFrame(attempts=2, status=InboundFrame.Status.FAILED, error="ValueError: boom")
    attempt_succeeded(frame, NOW)
    assert (frame.status, frame.processed_at, frame.error) == (InboundFrame.Status.PROCESSED, NOW, "")


def test_clip_error():
    assert ERROR_MAX_CHARS == 2000
    assert clip_error("") == ""
    assert clip_error("short") == "short"
    assert clip_error("x" * ERROR_MAX_CHARS) == "x" * ERROR_MAX_CHARS
    assert clip_error("y" * (ERROR_MAX_CHARS + 1)) == "y" * ERROR_MAX_CHARS
    assert clip_error("é" * 5000) == "é" * ERROR_MAX_CHARS
