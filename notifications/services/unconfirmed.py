"""Records that were committed but never confirmed by the broker, and their sweeping.

A process can die between committing a record and the broker's confirm (a web instance's
inbound batch, a publish, a worker's replies). Nothing would ever publish those: the sweeper
(`consumers_app.sweeper`, in every worker) finds them after a grace period and publishes them.
"""

import datetime
import uuid

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from notifications.models import InboundFrame, Message
from notifications.services.streams import with_epochs

# Records handled per sweep at most, so one sweep stays short.
SWEEP_BATCH = 500
# What a swept frame's record says, so it is republished once, not at every sweep.
SWEPT_NOTE = "queued again by the sweeper: the broker never confirmed it"


def _cutoff() -> datetime.datetime:
    return timezone.now() - datetime.timedelta(seconds=settings.RT_SWEEP_GRACE_SECONDS)


def unconfirmed_messages() -> list[Message]:
    """Messages still `accepted` past the grace period (oldest first)."""
    return with_epochs(
        list(
            Message.objects.filter(status=Message.Status.ACCEPTED, created_at__lt=_cutoff()).order_by(
                "created_at"
            )[:SWEEP_BATCH]
        )
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
