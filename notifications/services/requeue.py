"""Give dead inbound frames another full set of attempts (the admin's "requeue" action)."""

import logging
import uuid
from dataclasses import dataclass

from asgiref.sync import async_to_sync

from notifications import publishing
from notifications.broker import BrokerUnavailable
from notifications.models import InboundFrame
from notifications.services.inbound import queue_body, reopen_dead, restore_dead

logger = logging.getLogger(__name__)


@dataclass
class RequeueOutcome:
    requeued: int = 0
    error: str = ""


def requeue_dead_frames(frame_ids: list[uuid.UUID]) -> RequeueOutcome:
    outcome = RequeueOutcome()
    for frame in InboundFrame.objects.filter(id__in=frame_ids, status=InboundFrame.Status.DEAD):
        # Reopen first, so the worker that takes the copy finds a frame it may process.
        if not reopen_dead(frame):
            continue
        try:
            async_to_sync(publishing.current().publish_inbound)(queue_body(frame), str(frame.id))
        except BrokerUnavailable as exc:
            restore_dead(frame)
            outcome.error = str(exc)
            break
        outcome.requeued += 1
        logger.info("inbound %s requeued by an admin", frame.id)
    return outcome
