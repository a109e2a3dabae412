"""`python manage.py prune_realtime [--older-than DAYS]`: delete old records in small batches."""

import datetime

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from notifications.services.retention import DEFAULT_BATCH_SIZE, prune

# What the summary names, in the order it prints them.
LABELS = {
    "notifications.Delivery": "deliveries",
    "notifications.Message": "messages",
    "notifications.InboundFrame": "inbound frames",
    "notifications.IdempotencyKey": "idempotency keys",
}


class Command(BaseCommand):
    help = (
        "Delete deliveries, messages and inbound frames older than DAYS (default RT_RETENTION_DAYS) "
        "and idempotency keys older than 24 hours, in batches. Safe to run while the deployment runs."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--older-than",
            type=int,
            default=None,
            metavar="DAYS",
            help=f"Age in days of what is deleted (at least 1). Default RT_RETENTION_DAYS ({settings.RT_RETENTION_DAYS}).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help=f"Rows per DELETE, each its own transaction. Default {DEFAULT_BATCH_SIZE}.",
        )

    def handle(self, *args, older_than: int | None, batch_size: int, **options):
        days = settings.RT_RETENTION_DAYS if older_than is None else older_than
        if days < 1:
            raise CommandError("--older-than must be at least 1 day")
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        result = prune(datetime.timedelta(days=days), batch_size=batch_size)
        counts = dict(result.deleted)
        lines = [f"{name}: {counts.pop(label, 0)}" for label, name in LABELS.items()]
        lines += [f"{label}: {n}" for label, n in sorted(counts.items())]
        self.stdout.write(f"Deleted (older than {days} days; keys older than 24 hours):")
        for line in lines:
            self.stdout.write(f"  {line}")
