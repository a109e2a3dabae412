"""Give dead inbound frames another full set of attempts (the admin's "requeue" action)."""

import logging
import uuid
from dataclasses import dataclass

from asgiref.sync import async_to_sync

from notifications.broker import BrokerUnavailable
from notifications.models import InboundFrame
from notifications.services.inbound import queue_body

logger = logging.getLogger(__name__)


@dataclass
class RequeueOutcome:
    requeued: int = 0
    error: str = ""


def requeue_dead_frames(frame_ids: list[uuid.UUID]) -> RequeueOutcome:
    from consumers_app.bridge import get_bridge

    outcome = RequeueOutcome()
    for frame in InboundFrame.objects.filter(id__in=frame_ids, status=InboundFrame.Status.DEAD):
        note = f"requeued after {frame.attempts} attempt(s); last error: {frame.error}"[:2000]
        # Reopen first, so the worker that takes the copy finds a frame it may process.
        reopened = InboundFrame.objects.filter(id=frame.id, status=InboundFrame.Status.DEAD).update(
            status=InboundFrame.Status.ACCEPTED, attempts=0, error=note, processed_at=None, processed_by=""
        )
        if not reopened:
            continue
        try:
            async_to_sync(get_bridge().publish_inbound)(queue_body(frame), str(frame.id))
        except BrokerUnavailable as exc:
            # Nothing was queued: put the record back exactly as it was, attempts and all.
            InboundFrame.objects.filter(id=frame.id, status=InboundFrame.Status.ACCEPTED).update(
                status=InboundFrame.Status.DEAD,
                attempts=frame.attempts,
                error=frame.error,
                processed_at=frame.processed_at,
                processed_by=frame.processed_by,
            )
            outcome.error = str(exc)
            break
        outcome.requeued += 1
        logger.info("inbound %s requeued by an admin", frame.id)
    return outcome
