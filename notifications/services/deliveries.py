"""Writes of the delivery log (called in batches by the log writer, never per delivery).

On PostgreSQL a batch is one COPY and one UPDATE, whatever its size; elsewhere a bulk insert
and an update per ack. Either way the fan-out never waits for them.
"""

import datetime
import logging
import uuid

from django.db import IntegrityError, connection, transaction

from notifications.models import Delivery, Message
from notifications.services import pg_copy

logger = logging.getLogger(__name__)

DeliveryRow = tuple[uuid.UUID, int | None, str, str, datetime.datetime]
AckRow = tuple[uuid.UUID, str, datetime.datetime]

COLUMNS = ("message_id", "user_id", "connection", "instance", "delivered_at")
COPY_COLUMNS = ("message_id", "instance", "delivered_at", "user_id", "connection")


def write_delivery_log(deliveries: list[DeliveryRow], acks: list[AckRow]) -> None:
    """Insert deliveries, then apply acks (so an ack in the same batch finds its row)."""
    if deliveries:
        _insert_deliveries(deliveries)
    if acks:
        _apply_acks(acks)


def _insert_deliveries(rows: list[DeliveryRow]) -> None:
    try:
        with transaction.atomic():
            if connection.vendor == "postgresql":
                _copy(rows)
            elif connection.vendor == "sqlite":
                _sqlite_insert(rows)
            else:
                _bulk_create(rows)
        return
    except IntegrityError:
        pass
    # A row already logged (a replayed batch) fails the whole COPY: keep every row that can be
    # kept, leaving out deliveries of messages this database does not know (published around the
    # API; the link is not checked by the database, see models, so a COPY keeps them).
    known = set(Message.objects.filter(id__in={row[0] for row in rows}).values_list("id", flat=True))
    unknown = [row for row in rows if row[0] not in known]
    if unknown:
        logger.warning("delivery log: %d deliveries of unknown messages not recorded", len(unknown))
    with transaction.atomic():
        _bulk_create([row for row in rows if row[0] in known])


def _copy(rows: list[DeliveryRow]) -> None:
    """Rows of one message share its id, instance and time, and the messages of one broker
    message their instance and time: each is formatted once."""
    null, text = pg_copy.NULL, pg_copy.text
    prefixes: dict[tuple, str] = {}
    places: dict[tuple, str] = {}
    lines = []
    for message_id, user_id, conn, instance, at in rows:
        key = (message_id, instance, at)
        prefix = prefixes.get(key)
        if prefix is None:
            place = places.get((instance, at))
            if place is None:
                place = places[instance, at] = f"{text(instance)}\t{at.isoformat()}"
            prefix = prefixes[key] = f"{message_id}\t{place}"
        lines.append(f"{prefix}\t{null if user_id is None else user_id}\t{text(conn)}")
    pg_copy.copy_lines(Delivery, COPY_COLUMNS, lines)


def _sqlite_insert(rows: list[DeliveryRow]) -> None:
    """One prepared statement for the whole batch (the ORM compiles every row's SQL by itself)."""
    table = connection.ops.quote_name(Delivery._meta.db_table)
    adapt = connection.ops.adapt_datetimefield_value
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT OR IGNORE INTO {table} ({', '.join(COLUMNS)}) VALUES (%s, %s, %s, %s, %s)",
            [(m.hex, user, conn, instance, adapt(at)) for m, user, conn, instance, at in rows],
        )


def _bulk_create(rows: list[DeliveryRow]) -> None:
    Delivery.objects.bulk_create(
        [Delivery(**dict(zip(COLUMNS, row, strict=True))) for row in rows],
        batch_size=1000,
        ignore_conflicts=True,
    )


def _apply_acks(acks: list[AckRow]) -> None:
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(Delivery._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                UPDATE {table} AS d SET acked_at = a.acked_at
                FROM unnest(%s::uuid[], %s::text[], %s::timestamptz[]) AS a(message_id, connection, acked_at)
                WHERE d.message_id = a.message_id AND d.connection = a.connection AND d.acked_at IS NULL
                """,
                [[a[0] for a in acks], [a[1] for a in acks], [a[2] for a in acks]],
            )
        return
    for message_id, connection_id, acked_at in acks:
        Delivery.objects.filter(
            message_id=message_id, connection=connection_id, acked_at__isnull=True
        ).update(acked_at=acked_at)
