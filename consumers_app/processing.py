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
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from consumers_app.handlers.base import HandlerContext, InboundHandler
from consumers_app.handlers.registry import get_handler
from consumers_app.outages import INFRASTRUCTURE_ERRORS
from notifications import jsonutil
from notifications.models import InboundFrame, Message
from notifications.services import inbound as inbound_service
from notifications.services import streams
from notifications.services.messages import store_messages

logger = logging.getLogger(__name__)


class Verdict(enum.Enum):
    PROCESSED = "processed"  # publish `replies`, then ack
    RETRY = "retry"  # park in the retry queue for `delay` seconds, then ack
    DEAD = "dead"  # dead-letter it
    SKIP = "skip"  # nothing to do (a stale copy of a dead frame, a duplicate): ack


# Read once, at start: see `_test_crash_point`.
CRASH_AFTER_COMMIT_HOOK = os.environ.get("RT_TEST_CRASH_AFTER_COMMIT") == "1"
# The longest event name a record keeps (InboundFrame.event).
EVENT_MAX_CHARS = 100


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
    """One inbound frame to process (a broker message may carry several): its id and body, and
    how often the broker redelivered it.

    Redeliveries are attempts that died with their worker and so rolled back before they could
    count themselves.
    """

    frame_id: str
    body: dict[str, Any]
    redeliveries: int = 0


def work_from_body(body: dict[str, Any], redeliveries: int) -> Work:
    """A frame as the broker brought it; ValueError unless it has the shape a socket queues:
    a UUID `id`, a string `event`, an integer `user_id` or none."""
    if not isinstance(body, dict):
        raise ValueError(f"a frame is a JSON object, not {type(body).__name__}")
    try:
        frame_id = str(uuid.UUID(str(body["id"])))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"a frame needs a UUID `id`, got {str(body.get('id'))[:60]!r}") from exc
    user_id = body.get("user_id")
    if user_id is not None and (not isinstance(user_id, int) or isinstance(user_id, bool)):
        raise ValueError(f"frame {frame_id}: `user_id` is not an integer")
    event = body.get("event")
    if not isinstance(event, str) or not 0 < len(event) <= EVENT_MAX_CHARS:
        raise ValueError(f"frame {frame_id}: `event` is not a string of 1-{EVENT_MAX_CHARS} characters")
    return Work(frame_id=frame_id, body=body, redeliveries=redeliveries)


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
            inbound_service.save_attempts(changed)
        if replies:
            store_messages(replies)
    if CRASH_AFTER_COMMIT_HOOK:
        for frame in changed:
            _test_crash_point(frame)
    return outcomes


def _process_one(frame: InboundFrame, work: Work, worker_id: str, now: datetime) -> Outcome:
    if frame.status == InboundFrame.Status.PROCESSED:
        pending = streams.with_epochs(list(frame.replies.filter(status=Message.Status.ACCEPTED)))
        logger.info("inbound %s already processed by %s: skipped", frame.id, frame.processed_by)
        return Outcome(Verdict.PROCESSED, replies=pending, attempts=frame.attempts)
    if frame.status == InboundFrame.Status.DEAD:
        logger.info("inbound %s is dead: a stale copy, skipped", frame.id)
        return Outcome(Verdict.SKIP, attempts=frame.attempts)

    inbound_service.start_attempt(frame, worker_id, work.redeliveries)
    handler = get_handler(frame.event)
    context = HandlerContext(frame=frame, worker_id=worker_id)
    try:
        if handler is None:
            raise LookupError(f"no handler for event {frame.event!r} in this worker")
        if handler.writes_to_database:
            with transaction.atomic():
                _handle(handler, frame, context)
        else:
            _handle(handler, frame, context)
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception as exc:
        return _failed(frame, exc, now)
    inbound_service.attempt_succeeded(frame, now)
    return Outcome(Verdict.PROCESSED, replies=context.messages, attempts=frame.attempts, changed=True)


def _handle(handler: InboundHandler, frame: InboundFrame, context: HandlerContext) -> None:
    """Run the handler; a reply it asks for that could not be sent fails it (and its writes)."""
    handler.handle(frame, context)
    for reply in context.messages:
        try:
            jsonutil.dumps(reply.payload)
        except TypeError as exc:
            raise ValueError(f"the handler's reply cannot be encoded as JSON: {exc}") from None


def _locked_frames(batch: list[Work]) -> dict[str, InboundFrame]:
    ids = {work.frame_id for work in batch}
    # Locked in id order, so two workers holding copies of the same frames cannot deadlock.
    frames = {str(frame.id): frame for frame in inbound_service.locked_frames(ids)}
    missing = [work for work in batch if work.frame_id not in frames]
    if missing:
        # Queued by something other than a socket of this deployment: record it now, without a
        # sender that does not exist (the row would fail the whole batch's commit).
        named = {work.body.get("user_id") for work in missing} - {None}
        known = set(get_user_model().objects.filter(pk__in=named).values_list("pk", flat=True))
        for work in missing:
            if work.frame_id in frames:
                continue
            user_id = work.body.get("user_id")
            frames[work.frame_id] = InboundFrame.objects.create(
                id=uuid.UUID(work.frame_id),
                user_id=user_id if user_id in known else None,
                event=work.body["event"],
                payload=work.body.get("payload"),
            )
    return frames


def _failed(frame: InboundFrame, exc: Exception, now: datetime) -> Outcome:
    failure = inbound_service.attempt_failed(frame, exc, now)
    verdict = Verdict.DEAD if failure.dead else Verdict.RETRY
    return Outcome(verdict, delay=failure.retry_in, attempts=frame.attempts, error=frame.error, changed=True)


def _test_crash_point(frame: InboundFrame) -> None:
    """Test hook: die between commit and ack, for the frame that asks for it.

    Inert unless the worker process was started with RT_TEST_CRASH_AFTER_COMMIT=1 (the fault
    tests do): production workers never read a frame's payload for it.
    """
    if (
        frame.status == InboundFrame.Status.PROCESSED
        and isinstance(frame.payload, dict)
        and frame.payload.get("crash_after_commit") is True
    ):
        logger.warning("test hook: exiting between commit and ack of %s", frame.id)
        os._exit(137)
