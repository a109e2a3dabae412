"""Writes of the delivery log (called in batches by the log writer, never per delivery)."""

import datetime
import logging
import uuid

from django.db import IntegrityError, transaction

from notifications.models import Delivery, Message

logger = logging.getLogger(__name__)

DeliveryRow = tuple[uuid.UUID, int | None, str, str, datetime.datetime]
AckRow = tuple[uuid.UUID, str, datetime.datetime]


def write_delivery_log(deliveries: list[DeliveryRow], acks: list[AckRow]) -> None:
    """Insert deliveries, then apply acks (so an ack in the same batch finds its row)."""
    if deliveries:
        try:
            with transaction.atomic():
                _insert(deliveries)
        except IntegrityError:
            # A message unknown to this database (published around the API): keep the rest.
            known = set(
                Message.objects.filter(id__in={row[0] for row in deliveries}).values_list("id", flat=True)
            )
            dropped = [row for row in deliveries if row[0] not in known]
            logger.warning("delivery log: %d deliveries of unknown messages not recorded", len(dropped))
            with transaction.atomic():
                _insert([row for row in deliveries if row[0] in known])
    for message_id, connection, acked_at in acks:
        Delivery.objects.filter(message_id=message_id, connection=connection, acked_at__isnull=True).update(
            acked_at=acked_at
        )


def _insert(rows: list[DeliveryRow]) -> None:
    Delivery.objects.bulk_create(
        [
            Delivery(
                message_id=message_id,
                user_id=user_id,
                connection=connection,
                instance=instance,
                delivered_at=delivered_at,
            )
            for message_id, user_id, connection, instance, delivered_at in rows
        ],
        batch_size=1000,
        ignore_conflicts=True,
    )
