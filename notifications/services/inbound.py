"""Inbound frames at the socket end: recorded first, then queued, so each leaves a record."""

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from notifications.models import InboundFrame
from notifications.services import pg_copy

COPY_COLUMNS = (
    "id",
    "user_id",
    "ref",
    "event",
    "payload",
    "status",
    "attempts",
    "connection",
    "instance",
    "processed_by",
    "error",
    "accepted_at",
)


@dataclass(slots=True)
class NewInbound:
    """A frame a socket sent, before it is stored (a model instance costs more to build than
    the rest of the frame's way through the web instance)."""

    user_id: int
    event: str
    payload: Any
    ref: str
    connection: str
    instance: str
    id: uuid.UUID = field(default_factory=uuid.uuid4)


def record_inbound_batch(frames: list[NewInbound]) -> None:
    """Store the records of many frames, `accepted`, in one statement and one commit."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            _copy(frames)
        else:
            InboundFrame.objects.bulk_create([InboundFrame(**asdict(frame)) for frame in frames])


def _copy(frames: list[NewInbound]) -> None:
    now = timezone.now().isoformat()
    text, json_text = pg_copy.text, pg_copy.json_text
    accepted = InboundFrame.Status.ACCEPTED.value
    lines = [
        f"{frame.id}\t{frame.user_id}\t{text(frame.ref)}\t{text(frame.event)}\t{json_text(frame.payload)}\t"
        f"{accepted}\t0\t{text(frame.connection)}\t{text(frame.instance)}\t\t\t{now}"
        for frame in frames
    ]
    pg_copy.copy_lines(InboundFrame, COPY_COLUMNS, lines)


def queue_body(frame: NewInbound | InboundFrame) -> dict[str, Any]:
    """The frame as it travels on `<ns>.inbound` (JSON)."""
    return {"id": str(frame.id), "user_id": frame.user_id, "event": frame.event, "payload": frame.payload}


def mark_unqueued(frames: list[NewInbound], error: str) -> None:
    """The broker never took them: nothing will process them, and the senders were told `unavailable`."""
    InboundFrame.objects.filter(id__in=[frame.id for frame in frames]).update(
        status=InboundFrame.Status.DEAD, error=f"not queued: {error}"[:2000], processed_at=timezone.now()
    )
