"""Retention: delete old records in small batches, so pruning never holds long locks.

Every batch is its own short transaction over at most `batch_size` rows picked by primary key,
so web instances and workers writing meanwhile wait for one batch at most. Django's delete
follows the foreign keys: a message's remaining deliveries go with it, an idempotency key
keeps its row (its message becomes null) and a reply's `source_inbound` becomes null.
"""

import datetime
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from django.apps import apps
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from notifications.models import Delivery, IdempotencyKey, InboundFrame, Message
from notifications.services.idempotency import KEY_LIFETIME

logger = logging.getLogger(__name__)

# Rows per DELETE: big enough to make progress, small enough that one batch takes milliseconds.
DEFAULT_BATCH_SIZE = 1000


@dataclass
class PruneResult:
    """Rows deleted per model label (`notifications.Message`: 12), cascades included."""

    deleted: Counter = field(default_factory=Counter)

    def count(self, model) -> int:
        return self.deleted[model._meta.label]


def delete_in_batches(
    queryset: QuerySet,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[Counter], None] | None = None,
) -> Counter:
    """Delete what `queryset` matches, `batch_size` rows per transaction; counts per model label."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    model = queryset.model
    # No ordering: the planner walks the filter's index (created_at, ...) and stops at the limit.
    pks = queryset.order_by().values_list("pk", flat=True)
    total: Counter = Counter()
    while True:
        with transaction.atomic():
            batch = list(pks[:batch_size])
            if not batch:
                return total
            # only(pk): the collector need not load each row's payload to delete it.
            _, per_model = model.objects.filter(pk__in=batch).only("pk").delete()
        counts = Counter({label: n for label, n in per_model.items() if n})
        total.update(counts)
        if on_batch is not None:
            on_batch(counts)
        if len(batch) < batch_size:
            return total


def prune(
    older_than: datetime.timedelta,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    now: datetime.datetime | None = None,
) -> PruneResult:
    """Delete the deliveries, messages and inbound frames older than `older_than`, and the
    idempotency keys past their 24 hours.

    Messages still `accepted` (not yet published) and frames still being processed are kept:
    they are someone's unfinished work, not history.
    """
    if older_than < datetime.timedelta(days=1):
        # Messages are the streams' history (RT_HISTORY_TTL) and keys live 24 h: a day at least.
        raise ValueError("keep one day at least")
    now = now or timezone.now()
    cutoff = now - older_than
    result = PruneResult()
    steps: list[tuple[str, QuerySet]] = [
        # Keys first: deleting their messages later would only null them one by one.
        ("idempotency keys", IdempotencyKey.objects.filter(created_at__lt=now - KEY_LIFETIME)),
        ("deliveries", Delivery.objects.filter(delivered_at__lt=cutoff)),
        (
            "messages",
            Message.objects.filter(created_at__lt=cutoff).exclude(status=Message.Status.ACCEPTED),
        ),
        (
            "inbound frames",
            InboundFrame.objects.filter(
                accepted_at__lt=cutoff,
                status__in=[InboundFrame.Status.PROCESSED, InboundFrame.Status.DEAD],
            ),
        ),
    ]
    if apps.is_installed("axes"):
        from axes.models import AccessLog

        steps.append(("sign-in log", AccessLog.objects.filter(attempt_time__lt=cutoff)))
    for name, queryset in steps:
        deleted = delete_in_batches(queryset, batch_size)
        logger.info("Pruned %s older than %s: %s", name, cutoff.isoformat(), dict(deleted) or "none")
        result.deleted.update(deleted)
    return result
