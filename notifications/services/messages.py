"""Publishing messages to sockets: store the record, publish it confirmed, record the outcome."""

import logging
import time
import uuid
from typing import Any

from asgiref.sync import async_to_sync
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone

from notifications import metrics, publishing
from notifications.broker import BrokerUnavailable
from notifications.models import InboundFrame, Message, clip_error
from notifications.services import pg_copy, streams

logger = logging.getLogger(__name__)


def new_message(
    *,
    topic: str | None = None,
    user: AbstractBaseUser | None = None,
    user_id: int | None = None,
    broadcast: bool = False,
    event: str = "",
    payload: Any = None,
    publisher: AbstractBaseUser | None = None,
    source_inbound: InboundFrame | None = None,
    source_inbound_id: uuid.UUID | None = None,
    origin_instance: str = "",
) -> Message:
    """A message record, `accepted`, not yet saved.

    Related rows may be given by id (`user_id`, `source_inbound_id`): a worker builds one
    message per reply, and setting ids skips the checks Django makes on related objects.
    """
    related: dict[str, Any] = {}
    if user is not None:
        related["user"] = user
    elif user_id is not None:
        related["user_id"] = user_id
    if publisher is not None:
        related["publisher"] = publisher
    if source_inbound is not None:
        related["source_inbound"] = source_inbound
    elif source_inbound_id is not None:
        related["source_inbound_id"] = source_inbound_id
    return Message(
        topic=topic or None,
        broadcast=broadcast,
        event=event or "",
        payload=payload,
        origin_instance=origin_instance,
        **related,
    )


def create_message(**fields: Any) -> Message:
    """Store a message as `accepted`, numbered in its stream: the record exists before anything
    reaches the broker. Call inside a transaction (the stream stays locked until it commits)."""
    message = new_message(**fields)
    streams.number([message])
    message.save(force_insert=True)
    return message


MESSAGE_COLUMNS = (
    "id",
    "topic",
    "user_id",
    "broadcast",
    "event",
    "payload",
    "status",
    "publisher_id",
    "origin_instance",
    "source_inbound_id",
    "error",
    "created_at",
    "stream",
    "seq",
)


def store_messages(messages: list[Message]) -> None:
    """Number and store many new messages at once (a worker's replies): one COPY on PostgreSQL.
    Call inside a transaction."""
    streams.number(messages)
    if connection.vendor != "postgresql":
        Message.objects.bulk_create(messages)
        return
    now = timezone.now()
    text, json_text, null = pg_copy.text, pg_copy.json_text, pg_copy.NULL

    def nullable(value: Any) -> str:
        return null if value is None else text(str(value))

    lines = []
    for message in messages:
        message.created_at = now
        lines.append(
            f"{message.id}\t{nullable(message.topic)}\t{nullable(message.user_id)}\t"
            f"{'t' if message.broadcast else 'f'}\t{text(message.event)}\t{json_text(message.payload)}\t"
            f"{message.status}\t{nullable(message.publisher_id)}\t{text(message.origin_instance)}\t"
            f"{nullable(message.source_inbound_id)}\t{text(message.error)}\t{now.isoformat()}\t"
            f"{text(message.stream)}\t{message.seq}"
        )
    pg_copy.copy_lines(Message, MESSAGE_COLUMNS, lines)


def broker_body(message: Message) -> dict[str, Any]:
    """The message as it travels on `<ns>.broadcast` (JSON; every instance decodes it once)."""
    return {
        "id": str(message.id),
        "stream": message.stream,
        "seq": message.seq,
        "epoch": getattr(message, "epoch", None),
        "topic": message.topic,
        "user_id": message.user_id,
        "broadcast": message.broadcast,
        "event": message.event,
        "payload": message.payload,
        "published_at": message.published_at.isoformat().replace("+00:00", "Z")
        if message.published_at
        else None,
    }


def mark_published(messages: list[Message]) -> None:
    """Record the broker's confirm of messages (one update per publish time, usually one).

    They are durable in the broker already, so this commit need not wait for the disk: at worst
    a database crash leaves them `accepted` (published again on a redelivery; web instances drop
    the copy).
    """
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        for when in {message.published_at for message in messages}:
            Message.objects.filter(id__in=[m.id for m in messages if m.published_at == when]).update(
                status=Message.Status.PUBLISHED, published_at=when, error=""
            )
    for message in messages:
        message.status = Message.Status.PUBLISHED


def mark_failed(message: Message, error: str, *, sent: bool = True) -> None:
    """The broker did not confirm it. A message already confirmed stays `published`; one that
    was never sent gives its seq back to its stream (no hole in the numbering)."""
    message.error = clip_error(error if sent else streams.GIVEN_UP + error)
    with transaction.atomic():
        updated = (
            Message.objects.filter(id=message.id)
            .exclude(status=Message.Status.PUBLISHED)
            .update(status=Message.Status.FAILED, error=message.error)
        )
        if updated and not sent and message.seq is not None:
            streams.give_back(message)
    message.status = Message.Status.FAILED


def publish_from_web(message: Message) -> Message:
    """Publish through this process's publisher (from a request thread); raise BrokerUnavailable."""
    message.published_at = timezone.now()
    started = time.perf_counter()
    try:
        async_to_sync(publishing.current().publish_broadcast)(broker_body(message), str(message.id))
    except BrokerUnavailable as exc:
        metrics.publish_failures.inc()
        logger.warning("message %s not published: %s", message.id, exc)
        mark_failed(message, f"broker unavailable: {exc}", sent=exc.maybe_taken)
        raise
    metrics.publish_latency.observe(time.perf_counter() - started)
    metrics.messages_published.inc()
    mark_published([message])
    return message
