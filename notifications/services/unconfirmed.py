"""Records that were committed but never confirmed by the broker, and their sweeping.

A process can die between committing a record and the broker's confirm (a web instance's
inbound batch, a publish, a worker's replies). Nothing would ever publish those: the sweeper
(`consumers_app.sweeper`, in every worker) finds them after a grace period and publishes them.
Messages are found through their `PendingConfirm` rows (written as they are stored, deleted
as their confirm is recorded), frames through their status.
"""

import datetime
import uuid
from collections import Counter

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from notifications.models import InboundFrame, Message, PendingConfirm, PendingConfirmTicket
from notifications.services.streams import with_epochs

# Records handled per sweep at most, so one sweep stays short.
SWEEP_BATCH = 500
# What a swept frame's record says, so it is republished once, not at every sweep.
SWEPT_NOTE = "queued again by the sweeper: the broker never confirmed it"


def _cutoff() -> datetime.datetime:
    return timezone.now() - datetime.timedelta(seconds=settings.RT_SWEEP_GRACE_SECONDS)


def await_confirm(messages: list[Message]) -> None:
    """Write the `PendingConfirm` rows of messages being stored (call in their transaction), one
    per `created_at`, and give each message its row's ticket. (`messages.store_messages` sends
    INSERT_PENDING_SQL with its other statements instead, then calls `hand_tickets`.)"""
    by_time: dict[datetime.datetime, list[Message]] = {}
    for message in messages:
        by_time.setdefault(message.created_at, []).append(message)
    for created_at, stored in by_time.items():
        hand_tickets(stored, PendingConfirm.objects.create(created_at=created_at).pk)


def hand_tickets(messages: list[Message], row_id: int) -> None:
    """Tell the messages of one store their `PendingConfirm` row (see `settled_stores`)."""
    ticket = PendingConfirmTicket(row_id, len(messages))
    for message in messages:
        message.pending = ticket


INSERT_PENDING_SQL = f"INSERT INTO {PendingConfirm._meta.db_table} (created_at) VALUES (%s) RETURNING id"
DELETE_PENDING_SQL = f"DELETE FROM {PendingConfirm._meta.db_table} WHERE id = ANY(%s::bigint[])"


def settled_stores(messages: list[Message]) -> list[int]:
    """The `PendingConfirm` rows all of whose messages are among these (just recorded published):
    to delete in that record's transaction. A row some of whose messages are not (a batch the
    broker confirmed in part) stays: the sweeper publishes the rest, then deletes it."""
    counts = Counter(message.pending for message in messages)
    return [ticket.id for ticket, count in counts.items() if ticket is not None and count >= ticket.size]


def forget_settled(row_ids: list[int]) -> None:
    """Delete these `PendingConfirm` rows (see `settled_stores`; PostgreSQL sends DELETE_PENDING_SQL
    with the record of the confirm itself)."""
    if row_ids:
        PendingConfirm.objects.filter(id__in=row_ids).delete()


def unconfirmed_messages() -> list[Message]:
    """Messages still `accepted` past the grace period (oldest first), found through their
    `PendingConfirm` rows; the rows none of whose messages is `accepted` any more (published,
    failed, or deleted) are deleted first."""
    cutoff = _cutoff()
    accepted = Message.objects.filter(status=Message.Status.ACCEPTED)
    with transaction.atomic():
        due = PendingConfirm.objects.filter(created_at__lt=cutoff)
        due.exclude(Exists(accepted.filter(created_at=OuterRef("created_at")))).delete()
        times = list(due.order_by("created_at").values_list("created_at", flat=True)[:SWEEP_BATCH])
    if not times:
        return []
    return with_epochs(
        list(accepted.filter(created_at__in=times).order_by("created_at", "stream", "seq")[:SWEEP_BATCH])
    )


def unqueued_frames() -> list[InboundFrame]:
    """Frames still `accepted`, never attempted and never swept, past the grace period."""
    return list(
        InboundFrame.objects.filter(
            status=InboundFrame.Status.ACCEPTED, attempts=0, error="", accepted_at__lt=_cutoff()
        ).order_by("accepted_at")[:SWEEP_BATCH]
    )


def mark_swept_frames(frame_ids: list[uuid.UUID]) -> None:
    """Note on each record that it was queued again (only while it is still untouched)."""
    with transaction.atomic():
        InboundFrame.objects.filter(
            id__in=frame_ids, status=InboundFrame.Status.ACCEPTED, attempts=0, error=""
        ).update(error=SWEPT_NOTE)
