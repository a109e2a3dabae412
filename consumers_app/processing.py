"""Processing one inbound frame, effectively once (runs in a worker thread, synchronously).

The handler's writes, the replies it asks for and the frame's new status commit in ONE
transaction; only then does the worker publish the replies and ack. A redelivered frame that is
already processed is not handled again: its replies still waiting to be published are returned
so the worker publishes them (the bridge drops a reply it has already delivered).
"""

import enum
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone

from consumers_app.handlers.base import HandlerContext
from consumers_app.handlers.registry import get_handler
from notifications.models import InboundFrame, Message

logger = logging.getLogger(__name__)

# Errors of the database itself: the frame is not at fault, so no attempt is spent on it.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError)


class Verdict(enum.Enum):
    PROCESSED = "processed"  # publish `replies`, then ack
    RETRY = "retry"  # park in the retry queue for `delay` seconds, then ack
    DEAD = "dead"  # dead-letter it
    SKIP = "skip"  # nothing to do (a stale copy of a dead frame): ack


@dataclass
class Outcome:
    verdict: Verdict
    replies: list[Message] = field(default_factory=list)
    delay: int = 0
    attempts: int = 0
    error: str = ""


def process_frame(frame_id: str, body: dict[str, Any], worker_id: str, crashed_attempts: int = 0) -> Outcome:
    """Run the handler once for this frame unless it has already been processed.

    `crashed_attempts` is how often the broker redelivered this copy: attempts that died with
    their worker and so rolled back before they could count themselves.
    """
    with transaction.atomic():
        frame = _locked_frame(frame_id, body)
        if frame.status == InboundFrame.Status.PROCESSED:
            pending = list(frame.replies.filter(status=Message.Status.ACCEPTED))
            logger.info("inbound %s already processed by %s: skipped", frame_id, frame.processed_by)
            return Outcome(Verdict.PROCESSED, replies=pending, attempts=frame.attempts)
        if frame.status == InboundFrame.Status.DEAD:
            logger.info("inbound %s is dead: a stale copy, skipped", frame_id)
            return Outcome(Verdict.SKIP, attempts=frame.attempts)

        frame.attempts += 1 + crashed_attempts
        frame.processed_by = worker_id
        handler = get_handler(frame.event)
        context = HandlerContext(frame=frame, worker_id=worker_id)
        try:
            if handler is None:
                raise LookupError(f"no handler for event {frame.event!r} in this worker")
            with transaction.atomic():
                handler.handle(frame, context)
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            return _failed(frame, exc)
        frame.status = InboundFrame.Status.PROCESSED
        frame.processed_at = timezone.now()
        frame.error = ""
        frame.save(update_fields=["status", "attempts", "processed_by", "processed_at", "error"])
    _test_crash_point(frame)
    return Outcome(Verdict.PROCESSED, replies=context.messages, attempts=frame.attempts)


def _locked_frame(frame_id: str, body: dict[str, Any]) -> InboundFrame:
    frame = InboundFrame.objects.select_for_update().filter(id=frame_id).first()
    if frame is None:
        # Queued by something other than a socket of this deployment: record it now.
        frame = InboundFrame.objects.create(
            id=uuid.UUID(frame_id),
            user_id=body.get("user_id"),
            event=str(body.get("event", ""))[:100],
            payload=body.get("payload"),
        )
    return frame


def _failed(frame: InboundFrame, exc: Exception) -> Outcome:
    frame.error = f"{type(exc).__name__}: {exc}"[:2000]
    max_attempts = settings.RT_INBOUND_MAX_ATTEMPTS
    if frame.attempts >= max_attempts:
        frame.status = InboundFrame.Status.DEAD
        frame.processed_at = timezone.now()
        verdict, delay = Verdict.DEAD, 0
    else:
        frame.status = InboundFrame.Status.FAILED
        delays = settings.RT_INBOUND_RETRY_DELAYS
        verdict, delay = Verdict.RETRY, delays[min(frame.attempts, len(delays)) - 1]
    frame.save(update_fields=["status", "attempts", "processed_by", "processed_at", "error"])
    return Outcome(verdict, delay=delay, attempts=frame.attempts, error=frame.error)


def mark_dead(frame_id: str, error: str) -> None:
    """A frame the broker gave up on (or that cannot be decoded): record why."""
    InboundFrame.objects.filter(id=frame_id).exclude(status=InboundFrame.Status.PROCESSED).update(
        status=InboundFrame.Status.DEAD, error=error[:2000], processed_at=timezone.now()
    )


def _test_crash_point(frame: InboundFrame) -> None:
    """Test hook: die between commit and ack, for the frame that asks for it (never in production)."""
    if os.environ.get("RT_TEST_CRASH_AFTER_COMMIT") != "1":
        return
    if isinstance(frame.payload, dict) and frame.payload.get("crash_after_commit") is True:
        logger.warning("test hook: exiting between commit and ack of %s", frame.id)
        os._exit(137)
