"""Processing inbound frames, effectively once (runs in a worker thread, synchronously).

A batch of frames is processed in ONE transaction: each frame's handler runs in its own
savepoint (one failing frame does not undo the others), and the handlers' writes, the replies
they ask for and the frames' new statuses commit together; only then does the worker publish the
replies and ack. A redelivered frame that is already processed is not handled again: its replies
still waiting to be published are returned so the worker publishes them (web instances drop a
reply they have already delivered). Batching is what lets a few workers keep up with many
sockets: one commit per batch instead of several per frame.
"""

import enum
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from consumers_app.handlers.base import HandlerContext
from consumers_app.handlers.registry import get_handler
from notifications.models import InboundFrame, Message
from notifications.services.messages import store_messages

logger = logging.getLogger(__name__)

# Errors of the database itself: the frame is not at fault, so no attempt is spent on it.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError)
SAVED_FIELDS = ["status", "attempts", "processed_by", "processed_at", "error"]


class Verdict(enum.Enum):
    PROCESSED = "processed"  # publish `replies`, then ack
    RETRY = "retry"  # park in the retry queue for `delay` seconds, then ack
    DEAD = "dead"  # dead-letter it
    SKIP = "skip"  # nothing to do (a stale copy of a dead frame, a duplicate): ack


@dataclass
class Outcome:
    verdict: Verdict
    replies: list[Message] = field(default_factory=list)
    delay: int = 0
    attempts: int = 0
    error: str = ""
    changed: bool = False  # this call changed the frame (and its replies are new, unsaved)


@dataclass
class Work:
    """One delivery to process: the frame's id and body, and how often the broker redelivered it.

    Redeliveries are attempts that died with their worker and so rolled back before they could
    count themselves.
    """

    frame_id: str
    body: dict[str, Any]
    redeliveries: int = 0


def process_batch(batch: list[Work], worker_id: str) -> list[Outcome]:
    """Run each frame's handler once unless it has already been processed; one commit for all."""
    now = timezone.now()
    with transaction.atomic():
        frames = _locked_frames(batch)
        outcomes: list[Outcome] = []
        changed: list[InboundFrame] = []
        replies: list[Message] = []
        seen: set[str] = set()
        for work in batch:
            frame = frames[work.frame_id]
            if work.frame_id in seen:
                outcomes.append(Outcome(Verdict.SKIP, attempts=frame.attempts))
                continue
            seen.add(work.frame_id)
            outcome = _process_one(frame, work, worker_id, now)
            outcomes.append(outcome)
            if outcome.changed:
                changed.append(frame)
                replies.extend(outcome.replies)
        if changed:
            _save_frames(changed)
        if replies:
            store_messages(replies)
    for frame in changed:
        _test_crash_point(frame)
    return outcomes


def _process_one(frame: InboundFrame, work: Work, worker_id: str, now) -> Outcome:
    if frame.status == InboundFrame.Status.PROCESSED:
        pending = list(frame.replies.filter(status=Message.Status.ACCEPTED))
        logger.info("inbound %s already processed by %s: skipped", frame.id, frame.processed_by)
        return Outcome(Verdict.PROCESSED, replies=pending, attempts=frame.attempts)
    if frame.status == InboundFrame.Status.DEAD:
        logger.info("inbound %s is dead: a stale copy, skipped", frame.id)
        return Outcome(Verdict.SKIP, attempts=frame.attempts)

    frame.attempts += 1 + work.redeliveries
    frame.processed_by = worker_id
    handler = get_handler(frame.event)
    context = HandlerContext(frame=frame, worker_id=worker_id)
    try:
        if handler is None:
            raise LookupError(f"no handler for event {frame.event!r} in this worker")
        if handler.writes_to_database:
            with transaction.atomic():
                handler.handle(frame, context)
        else:
            handler.handle(frame, context)
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception as exc:
        return _failed(frame, exc, now)
    frame.status = InboundFrame.Status.PROCESSED
    frame.processed_at = now
    frame.error = ""
    return Outcome(Verdict.PROCESSED, replies=context.messages, attempts=frame.attempts, changed=True)


def _save_frames(frames: list[InboundFrame]) -> None:
    """One UPDATE per distinct outcome (usually one for the whole batch), not one per frame."""
    groups: dict[tuple, list[uuid.UUID]] = {}
    for frame in frames:
        values = tuple(getattr(frame, name) for name in SAVED_FIELDS)
        groups.setdefault(values, []).append(frame.id)
    for values, ids in groups.items():
        InboundFrame.objects.filter(id__in=ids).update(**dict(zip(SAVED_FIELDS, values, strict=True)))


def _locked_frames(batch: list[Work]) -> dict[str, InboundFrame]:
    ids = {work.frame_id for work in batch}
    # Locked in id order, so two workers holding copies of the same frames cannot deadlock.
    frames = {
        str(frame.id): frame
        for frame in InboundFrame.objects.select_for_update().filter(id__in=ids).order_by("id")
    }
    for work in batch:
        if work.frame_id not in frames:
            # Queued by something other than a socket of this deployment: record it now.
            frames[work.frame_id] = InboundFrame.objects.create(
                id=uuid.UUID(work.frame_id),
                user_id=work.body.get("user_id"),
                event=str(work.body.get("event", ""))[:100],
                payload=work.body.get("payload"),
            )
    return frames


def _failed(frame: InboundFrame, exc: Exception, now) -> Outcome:
    frame.error = f"{type(exc).__name__}: {exc}"[:2000]
    max_attempts = settings.RT_INBOUND_MAX_ATTEMPTS
    if frame.attempts >= max_attempts:
        frame.status = InboundFrame.Status.DEAD
        frame.processed_at = now
        verdict, delay = Verdict.DEAD, 0
    else:
        frame.status = InboundFrame.Status.FAILED
        delays = settings.RT_INBOUND_RETRY_DELAYS
        verdict, delay = Verdict.RETRY, delays[min(frame.attempts, len(delays)) - 1]
    return Outcome(verdict, delay=delay, attempts=frame.attempts, error=frame.error, changed=True)


def mark_dead(frame_id: str, error: str) -> None:
    """A frame the broker gave up on (or that cannot be decoded): record why."""
    InboundFrame.objects.filter(id=frame_id).exclude(status=InboundFrame.Status.PROCESSED).update(
        status=InboundFrame.Status.DEAD, error=error[:2000], processed_at=timezone.now()
    )


def mark_replies_published(replies: list[Message]) -> None:
    """One update for a batch's replies, once the broker confirmed them all. They are durable in
    the broker already, so the commit need not wait for the disk (at worst they stay `accepted`
    and are published again on a redelivery; web instances drop the copy)."""
    published_at = {message.published_at for message in replies}
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        for when in published_at:
            Message.objects.filter(id__in=[m.id for m in replies if m.published_at == when]).update(
                status=Message.Status.PUBLISHED, published_at=when, error=""
            )


def _test_crash_point(frame: InboundFrame) -> None:
    """Test hook: die between commit and ack, for the frame that asks for it (never in production)."""
    if os.environ.get("RT_TEST_CRASH_AFTER_COMMIT") != "1":
        return
    if (
        frame.status == InboundFrame.Status.PROCESSED
        and isinstance(frame.payload, dict)
        and frame.payload.get("crash_after_commit") is True
    ):
        logger.warning("test hook: exiting between commit and ack of %s", frame.id)
        os._exit(137)
