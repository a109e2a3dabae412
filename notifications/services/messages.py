"""Publishing messages to sockets: store the record, publish it confirmed, record the outcome.

(One message or a thousand, from a request thread or the event loop: the variants share their
record-keeping, which is why they share a module.)
"""

import asyncio
import logging
import secrets
import time
import uuid
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.db.models.base import ModelState
from django.db.models.signals import post_init, pre_init
from django.utils import timezone

from notifications import broker, metrics, publishing
from notifications.broker import BrokerUnavailable
from notifications.models import InboundFrame, Message, clip_error
from notifications.services import pg_arrays, pg_copy, streams, unconfirmed

logger = logging.getLogger(__name__)


# Message's columns in model order: a model built from positional values (as Django builds the
# rows it reads) skips the per-field default and keyword handling, half of its cost, which a
# batch of a thousand or a worker's replies pay per message.
_MESSAGE_ATTNAMES = [field.attname for field in Message._meta.concrete_fields]
_MESSAGE_INDEX = {name: index for index, name in enumerate(_MESSAGE_ATTNAMES)}
_MESSAGE_DEFAULTS = [
    None if field.primary_key or not field.has_default() or callable(field.default) else field.get_default()
    for field in Message._meta.concrete_fields
]
# Defaults made fresh per message (a callable such as `dict` must not give every message one object).
_MESSAGE_CALLED_DEFAULTS = [
    (index, field)
    for index, field in enumerate(Message._meta.concrete_fields)
    if not field.primary_key and field.has_default() and callable(field.default)
]


_RELATED_FIELDS: dict[str, Any] = {
    name: Message._meta.get_field(name) for name in ("user", "publisher", "source_inbound")
}


def new_message(
    *,
    message_id: uuid.UUID | None = None,
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

    `message_id` is for ids chosen beforehand (a batch's, see `batch_ids`).
    Related rows may be given by id (`user_id`, `source_inbound_id`): a worker builds one
    message per reply, and setting ids skips the checks Django makes on related objects.
    """
    values = _MESSAGE_DEFAULTS.copy()
    for position, default_field in _MESSAGE_CALLED_DEFAULTS:
        values[position] = default_field.get_default()
    index = _MESSAGE_INDEX
    values[index["id"]] = message_id or uuid.uuid4()
    values[index["topic"]] = topic or None
    values[index["broadcast"]] = broadcast
    values[index["event"]] = event or ""
    values[index["payload"]] = payload
    values[index["origin_instance"]] = origin_instance
    values[index["user_id"]] = user.pk if user is not None else user_id
    values[index["publisher_id"]] = publisher.pk if publisher is not None else None
    values[index["source_inbound_id"]] = (
        source_inbound.pk if source_inbound is not None else source_inbound_id
    )
    message = _from_values(values)
    # Related objects given as objects stay cached on the message, as the keyword form keeps them
    # (cached directly: the attribute's setter also asks the database routers, per message).
    for name, related in (("user", user), ("publisher", publisher), ("source_inbound", source_inbound)):
        if related is not None:
            _RELATED_FIELDS[name].set_cached_value(message, related)
    return message


def id_text(message: Message) -> str:
    """The message's id as text, formatted once: a publish writes it to the database, the broker
    and the answer (a thousand times for a batch). The id of a stored message never changes."""
    text = message.__dict__.get("_id_text")
    if text is None:
        text = message.__dict__["_id_text"] = str(message.id)
    return text


def _from_values(values: list[Any]) -> Message:
    """`Message(*values)` without Model.__init__'s loop over the fields (3 of its 4 µs): for
    positional values it only sets a fresh state and each column's attribute, which this does at
    once. Unless something listens to the init signals, which only __init__ sends."""
    if pre_init.has_listeners(Message) or post_init.has_listeners(Message):
        return Message(*values)  # type: ignore[misc]  # django-stubs types only keyword construction
    message = Message.__new__(Message)
    message.__dict__.update(zip(_MESSAGE_ATTNAMES, values, strict=True))
    message._state = ModelState()
    return message


def create_message(**fields: Any) -> Message:
    """Store a message as `accepted`, numbered in its stream: the record exists before anything
    reaches the broker. Call inside a transaction (the stream stays locked until it commits)."""
    message = new_message(**fields)
    streams.number([message])
    message.save(force_insert=True)
    unconfirmed.await_confirm([message])
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
    """Number and store many new messages at once: one COPY on PostgreSQL. Call inside a
    transaction, last: numbering locks the streams' rows until the commit, and every publisher to
    those streams waits meanwhile, so the rows are formatted before (all but their seqs) and
    nothing but the COPY runs between the numbering and the caller's commit."""
    if connection.vendor != "postgresql":
        streams.number(messages)
        Message.objects.bulk_create(messages)
        unconfirmed.await_confirm(messages)
        return
    now = timezone.now()
    created = now.isoformat()
    text, json_text, null = pg_copy.text, pg_copy.json_text, pg_copy.NULL

    def nullable(value: Any) -> str:
        return null if value is None else text(str(value))

    numbering = streams.Numbering(messages)  # gives each message its stream (no database yet)
    heads = []
    for message in messages:
        message.created_at = now
        heads.append(
            f"{id_text(message)}\t{nullable(message.topic)}\t{nullable(message.user_id)}\t"
            f"{'t' if message.broadcast else 'f'}\t{text(message.event)}\t{json_text(message.payload)}\t"
            f"{message.status}\t{nullable(message.publisher_id)}\t{text(message.origin_instance)}\t"
            f"{nullable(message.source_inbound_id)}\t{text(message.error)}\t{created}\t"
            f"{text(message.stream)}\t"
        )
    # The store's PendingConfirm row and the numbering, in one round trip (each ~2 ms on a loaded
    # machine, here while the group's requests wait): the streams stay locked from here to the commit.
    advance_sql, advance_params = numbering.statement()
    with connection.cursor() as cursor:
        cursor.execute(f"{unconfirmed.INSERT_PENDING_SQL}; {advance_sql}", [now, *advance_params])
        pending_id = cursor.fetchone()[0]
        cursor.nextset()
        numbering.apply(cursor.fetchall())
    unconfirmed.hand_tickets(messages, pending_id)
    lines = [f"{head}{message.seq}" for head, message in zip(heads, messages, strict=True)]
    pg_copy.copy_lines(Message, MESSAGE_COLUMNS, lines)


def broker_body(message: Message, times: dict[Any, str | None] | None = None) -> dict[str, Any]:
    """The message as it travels on `<ns>.broadcast` (JSON; every instance decodes it once).

    `times` caches the formatted publication times across the messages of one publish (they
    share one)."""
    published = message.published_at
    if times is None:
        times = {}
    if published not in times:
        times[published] = published.isoformat().replace("+00:00", "Z") if published else None
    return {
        "id": id_text(message),
        "stream": message.stream,
        "seq": message.seq,
        "epoch": getattr(message, "epoch", None),
        "topic": message.topic,
        "user_id": message.user_id,
        "broadcast": message.broadcast,
        "event": message.event,
        "payload": message.payload,
        "published_at": times[published],
    }


MARK_PUBLISHED_SQL = (
    "UPDATE notifications_message SET status = %s, published_at = %s, error = '' WHERE id = ANY(%s::uuid[])"
)


def mark_published(messages: list[Message]) -> None:
    """Record the broker's confirm of messages (one update per publish time, usually one), and
    forget the `PendingConfirm` rows of the stores all of whose messages these are.

    They are durable in the broker already, so this commit need not wait for the disk: at worst
    a database crash leaves them `accepted` (published again on a redelivery; web instances drop
    the copy). On PostgreSQL the statements travel in ONE query, which outside a transaction is
    its own (PostgreSQL runs the statements of one simple query as one transaction): one round
    trip instead of five, each ~2 ms on a loaded machine, on every publish's way to its answer.
    Inside a caller's transaction it adds no savepoint: a failure here fails it anyway.
    """
    if not messages:
        return
    times = {message.published_at for message in messages}
    settled = unconfirmed.settled_stores(messages)
    if connection.vendor == "postgresql":
        statements = ["SET LOCAL synchronous_commit TO OFF"]
        params: list[Any] = []
        for when in times:
            # One array parameter: the ORM's `IN (%s, ...)` is a new query text, and a parameter
            # to quote, per message (a batch's confirm cost more than its COPY).
            statements.append(MARK_PUBLISHED_SQL)
            params += [Message.Status.PUBLISHED.value, when, pg_arrays.literal(_ids_at(messages, when))]
        if settled:
            statements.append(unconfirmed.DELETE_PENDING_SQL)
            params.append(pg_arrays.literal(settled))
        with connection.cursor() as cursor:
            cursor.execute("; ".join(statements), params)
    else:
        with transaction.atomic(savepoint=False):
            for when in times:
                Message.objects.filter(id__in=_ids_at(messages, when)).update(
                    status=Message.Status.PUBLISHED, published_at=when, error=""
                )
            unconfirmed.forget_settled(settled)
    for message in messages:
        message.status = Message.Status.PUBLISHED


def _ids_at(messages: list[Message], when: Any) -> list[str]:
    return [id_text(message) for message in messages if message.published_at == when]


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


# --- batches (POST /api/v1/messages/batch/) ---------------------------------------------------

# A batch travels several messages per broker message (`{"messages": [...]}`, which every web
# instance unpacks): the broker and its clients cost about the same per broker message whatever
# its size, and an instance writes a socket's messages of one broker message in one system call
# (`consumers_app.outbound.corked`), so publishes grouped together should travel together.
# Bounded in count and bytes, so one broker message stays well under a megabyte or so and an
# instance's event loop is not held for long by one (500 messages: ~20 ms).
BROKER_BATCH_ITEMS = 500
BROKER_BATCH_BYTES = 1 << 20
# The last bytes of a batch message's id are its index in the request (at most 65,536 items).
_INDEX_BYTES = 2


def batch_ids(count: int) -> list[uuid.UUID]:
    """Ids for the `count` messages of one batch request, in request order.

    Random version-4 UUIDs that share their first 14 bytes; the last two are the item's index. So
    a batch is found again, in request order, by one range read on the primary key from its first
    message's id (`batch_id_range`): an Idempotency-Key remembers only that first message.
    """
    if not 0 < count <= 1 << (8 * _INDEX_BYTES):
        raise ValueError(f"a batch holds 1 to {1 << (8 * _INDEX_BYTES)} messages")
    # The version and variant bits lie in the shared bytes: set once, then each index is added.
    first = uuid.UUID(bytes=secrets.token_bytes(16 - _INDEX_BYTES) + b"\x00" * _INDEX_BYTES, version=4).int
    return [uuid.UUID(int=first | index) for index in range(count)]


def batch_id_range(first: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID]:
    """The lowest and highest id the batch whose first message is `first` can hold."""
    prefix = first.bytes[: 16 - _INDEX_BYTES]
    return (
        uuid.UUID(bytes=prefix + b"\x00" * _INDEX_BYTES),
        uuid.UUID(bytes=prefix + b"\xff" * _INDEX_BYTES),
    )


def broker_groups(messages: list[Message]) -> list[tuple[list[Message], bytes, list[str]]]:
    """The messages cut into broker messages of at most BROKER_BATCH_ITEMS items and about
    BROKER_BATCH_BYTES bytes (one larger item travels alone), each `pack`ed, in list order; with
    their routing keys. Broadcasts travel apart (to every instance); the others are routed with
    every recipient's key (RabbitMQ's `BCC`), so an instance takes a pack only if it holds one of
    its recipients (CONTRACT §2), and a batch to many users is a few broker messages, not one
    per user."""
    by_kind: dict[bool, list[tuple[Message, bytes, str]]] = {}
    times: dict[Any, str | None] = {}
    for message in messages:
        fields = broker_body(message, times)
        key = broker.routing_key(fields)
        by_kind.setdefault(not key, []).append((message, broker.encode(fields), key))
    groups: list[tuple[list[Message], bytes, list[str]]] = []
    for items in by_kind.values():
        members: list[Message] = []
        bodies: list[bytes] = []
        keys: dict[str, None] = {}
        size = 0
        for message, body, key in items:
            if members and (len(members) >= BROKER_BATCH_ITEMS or size + len(body) > BROKER_BATCH_BYTES):
                groups.append((members, broker.pack_encoded(broker.MESSAGES, bodies), list(keys)))
                members, bodies, keys, size = [], [], {}, 0
            members.append(message)
            bodies.append(body)
            keys[key] = None
            size += len(body) + 1
        if members:
            groups.append((members, broker.pack_encoded(broker.MESSAGES, bodies), list(keys)))
    return groups


async def publish_many(messages: list[Message]) -> list[tuple[list[Message], BrokerUnavailable]]:
    """Publish stored messages in a few broker messages, all sent at once and each confirmed (one
    channel keeps their order); the groups the broker did not confirm, with why (none: all are
    in the broker). Sets `published_at` of every message; records nothing (see `record_batch`)."""
    when = timezone.now()
    for message in messages:
        message.published_at = when
    groups = broker_groups(messages)
    try:
        publisher = publishing.current()
    except BrokerUnavailable as exc:  # nothing was sent
        metrics.publish_failures.inc(len(messages))
        logger.warning("%d messages not published: %s", len(messages), exc)
        return [(members, exc) for members, _, _ in groups]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            publisher.publish_message(body, broker.message_id_for([m.id for m in members]), key)
            for members, body, key in groups
        ),
        return_exceptions=True,
    )
    failed: list[tuple[list[Message], BrokerUnavailable]] = []
    for (members, _, _), result in zip(groups, results, strict=True):
        if isinstance(result, BrokerUnavailable):
            failed.append((members, result))
            metrics.publish_failures.inc(len(members))
        elif isinstance(result, BaseException):
            raise result
        else:
            metrics.messages_published.inc(len(members))
    metrics.publish_latency.observe(time.perf_counter() - started)
    if failed:
        logger.warning(
            "%d of %d messages of a batch not published: %s",
            sum(len(members) for members, _ in failed),
            len(messages),
            failed[0][1],
        )
    return failed


def mark_batch_failed(messages: list[Message], error: str, *, sent: bool) -> None:
    """None of a batch's messages reached the broker for sure: all `failed`. With `sent` False
    (nothing went out) every stream gets its seqs back, from its highest one down, so no stream
    is left with a hole (give_back also takes back the given-up messages just below the top)."""
    text = clip_error(error if sent else streams.GIVEN_UP + error)
    ids = [message.id for message in messages]
    with transaction.atomic():
        Message.objects.filter(id__in=ids).exclude(status=Message.Status.PUBLISHED).update(
            status=Message.Status.FAILED, error=text
        )
        if not sent:
            tops: dict[str, Message] = {}
            for message in messages:
                if message.seq is None:
                    continue
                top = tops.get(message.stream)
                if top is None or (top.seq is not None and message.seq > top.seq):
                    tops[message.stream] = message
            for stream in sorted(tops):  # the order numbering locks them in
                streams.give_back(tops[stream])
            seqs = dict(Message.objects.filter(id__in=ids).values_list("id", "seq"))
            for message in messages:
                message.seq = seqs.get(message.id)
    for message in messages:
        message.status = Message.Status.FAILED
        message.error = text
