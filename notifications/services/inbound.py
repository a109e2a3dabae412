"""Inbound frames at the socket end: recorded first, then queued, so each leaves a record."""

from typing import Any

from django.utils import timezone

from notifications.models import InboundFrame


def record_inbound(
    *, user_id: int, event: str, payload: Any, ref: str, connection: str, instance: str
) -> InboundFrame:
    return InboundFrame.objects.create(
        user_id=user_id, event=event, payload=payload, ref=ref, connection=connection, instance=instance
    )


def queue_body(frame: InboundFrame) -> dict[str, Any]:
    """The frame as it travels on `<ns>.inbound` (JSON)."""
    return {"id": str(frame.id), "user_id": frame.user_id, "event": frame.event, "payload": frame.payload}


def mark_unqueued(frame: InboundFrame, error: str) -> None:
    """The broker never took it: nothing will process it, and the sender was told `unavailable`."""
    InboundFrame.objects.filter(id=frame.id).update(
        status=InboundFrame.Status.DEAD, error=f"not queued: {error}"[:2000], processed_at=timezone.now()
    )
