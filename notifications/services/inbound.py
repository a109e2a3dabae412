"""Inbound frames at the socket end: recorded first, then queued, so each leaves a record."""

from typing import Any

from django.db import transaction
from django.utils import timezone

from notifications.models import InboundFrame


def new_inbound(
    *, user_id: int, event: str, payload: Any, ref: str, connection: str, instance: str
) -> InboundFrame:
    """An inbound frame's record, not yet saved (its id is known before it is stored)."""
    return InboundFrame(
        user_id=user_id, event=event, payload=payload, ref=ref, connection=connection, instance=instance
    )


def record_inbound_batch(frames: list[InboundFrame]) -> None:
    """Store the records of many frames in one insert and one commit."""
    with transaction.atomic():
        InboundFrame.objects.bulk_create(frames)


def queue_body(frame: InboundFrame) -> dict[str, Any]:
    """The frame as it travels on `<ns>.inbound` (JSON)."""
    return {"id": str(frame.id), "user_id": frame.user_id, "event": frame.event, "payload": frame.payload}


def mark_unqueued(frame: InboundFrame, error: str) -> None:
    """The broker never took it: nothing will process it, and the sender was told `unavailable`."""
    InboundFrame.objects.filter(id=frame.id).update(
        status=InboundFrame.Status.DEAD, error=f"not queued: {error}"[:2000], processed_at=timezone.now()
    )
