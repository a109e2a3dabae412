"""Every status change of an inbound frame, from its record at the socket to processed or dead.

The socket's side records a frame before it is queued (so each leaves a record an admin can
find); the worker's side counts attempts and records outcomes; the admin's requeue reopens dead
frames. All of them change a frame's status here and nowhere else.
"""

import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from notifications.models import InboundFrame, clip_error
from notifications.services import pg_arrays, pg_copy

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
    """The broker never took them: nothing will process them, and the senders were told `unavailable`.

    Only frames still `accepted` change: a publish whose confirm was lost may have reached a
    worker all the same, and a frame it processed stays processed.
    """
    InboundFrame.objects.filter(
        id__in=[frame.id for frame in frames], status=InboundFrame.Status.ACCEPTED
    ).update(
        status=InboundFrame.Status.DEAD, error=clip_error(f"not queued: {error}"), processed_at=timezone.now()
    )


def mark_dead(frame_id: str, error: str) -> None:
    """A frame the broker gave up on (its workers kept dying): record why. A processed frame stays so."""
    InboundFrame.objects.filter(id=frame_id).exclude(status=InboundFrame.Status.PROCESSED).update(
        status=InboundFrame.Status.DEAD, error=clip_error(error), processed_at=timezone.now()
    )


# --- a worker's attempt (in memory, saved with its batch by `save_attempts`) -------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """What a failed attempt leads to: another attempt after `retry_in` seconds, or none (dead)."""

    dead: bool
    retry_in: int = 0


def start_attempt(frame: InboundFrame, worker_id: str, redeliveries: int) -> None:
    """Count this attempt, and the `redeliveries` that died with their worker before they could."""
    frame.attempts += 1 + redeliveries
    frame.processed_by = worker_id


def attempt_succeeded(frame: InboundFrame, now: datetime) -> None:
    frame.status = InboundFrame.Status.PROCESSED
    frame.processed_at = now
    frame.error = ""


def attempt_failed(frame: InboundFrame, exc: Exception, now: datetime) -> Failure:
    """Retry with the next delay of RT_INBOUND_RETRY_DELAYS, or dead after RT_INBOUND_MAX_ATTEMPTS."""
    frame.error = clip_error(f"{type(exc).__name__}: {exc}")
    if frame.attempts >= settings.RT_INBOUND_MAX_ATTEMPTS:
        frame.status = InboundFrame.Status.DEAD
        frame.processed_at = now
        return Failure(dead=True)
    frame.status = InboundFrame.Status.FAILED
    return Failure(dead=False, retry_in=retry_delay(frame.attempts))


def retry_delay(attempts: int) -> int:
    """Seconds before the next attempt of a frame that failed `attempts` times (the last delay repeats)."""
    delays = settings.RT_INBOUND_RETRY_DELAYS
    return delays[min(attempts, len(delays)) - 1]


ATTEMPT_FIELDS = ("status", "attempts", "processed_by", "processed_at", "error")


# One query text for any number of frames: psycopg parses and quotes an `IN (%s, ...)` of N
# frames anew for every N, which cost a worker more than the database's own work.
LOCK_SQL = "SELECT * FROM notifications_inboundframe WHERE id = ANY(%s::uuid[]) ORDER BY id FOR UPDATE"
SAVE_ATTEMPTS_SQL = (
    "UPDATE notifications_inboundframe SET status = %s, attempts = %s, processed_by = %s, "
    "processed_at = %s, error = %s WHERE id = ANY(%s::uuid[])"
)


def locked_frames(ids: Iterable[str]) -> Iterable[InboundFrame]:
    """The records of these frames, locked until the transaction ends, in id order (so two
    workers holding copies of the same frames cannot deadlock)."""
    if connection.vendor == "postgresql":
        return InboundFrame.objects.raw(LOCK_SQL, [pg_arrays.literal(ids)])
    return InboundFrame.objects.select_for_update().filter(id__in=ids).order_by("id")


def save_attempts(frames: list[InboundFrame]) -> None:
    """One UPDATE per distinct outcome (usually one for the whole batch), not one per frame."""
    groups: dict[tuple[Any, ...], list[uuid.UUID]] = {}
    for frame in frames:
        values = tuple(getattr(frame, name) for name in ATTEMPT_FIELDS)
        groups.setdefault(values, []).append(frame.id)
    for values, ids in groups.items():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(SAVE_ATTEMPTS_SQL, [*values, pg_arrays.literal(ids)])
        else:
            InboundFrame.objects.filter(id__in=ids).update(**dict(zip(ATTEMPT_FIELDS, values, strict=True)))


# --- the admin's requeue ---------------------------------------------------------------------


def reopen_dead(frame: InboundFrame) -> bool:
    """Give a dead frame a full set of attempts again; False if it is no longer dead."""
    note = clip_error(f"requeued after {frame.attempts} attempt(s); last error: {frame.error}")
    return bool(
        InboundFrame.objects.filter(id=frame.id, status=InboundFrame.Status.DEAD).update(
            status=InboundFrame.Status.ACCEPTED, attempts=0, error=note, processed_at=None, processed_by=""
        )
    )


def restore_dead(frame: InboundFrame) -> None:
    """Undo `reopen_dead` when nothing was queued: the record exactly as it was, attempts and all."""
    InboundFrame.objects.filter(id=frame.id, status=InboundFrame.Status.ACCEPTED).update(
        status=InboundFrame.Status.DEAD,
        attempts=frame.attempts,
        error=frame.error,
        processed_at=frame.processed_at,
        processed_by=frame.processed_by,
    )
