"""Publishing through the API in three steps, shared by the DRF views and the fast ASGI path.

`accept` (sync, one database hop): validate, claim the Idempotency-Key, store the message(s)
numbered in one transaction. `publish` (async, on the event loop): confirmed by the broker.
`finish` (sync, one database hop): record the outcome and build the answer. The DRF views run the
sync steps in their request thread; `fast_publish` runs each in one `database_sync_to_async` hop.
Errors are DRF's exceptions (APIException), so both paths answer with the same shapes.
(Single and batch publishes, alone or grouped: four flows of the same three steps.)
"""

import logging
import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import connection, transaction
from rest_framework.exceptions import APIException, NotFound, ValidationError

from notifications import selectors
from notifications.api.errors import BrokerUnavailableError, Conflict, PayloadTooLarge, Unprocessable
from notifications.api.serializers import (
    MessageSerializer,
    PublishSerializer,
    message_record,
    plainly_valid,
    too_large,
)
from notifications.broker import BrokerUnavailable
from notifications.models import IdempotencyKey, Message
from notifications.services import idempotency, pg_arrays, streams
from notifications.services.messages import (
    batch_id_range,
    batch_ids,
    mark_batch_failed,
    mark_failed,
    mark_published,
    new_message,
    publish_many,
    publish_now,
    store_messages,
)

logger = logging.getLogger(__name__)

# A retry whose key's message was deleted publishes nothing and gets this 404.
MESSAGE_DELETED = "The message published with this Idempotency-Key was deleted."
# Items of one batch request at most (CONTRACT §3).
BATCH_MAX_ITEMS = 1000


def check_key(key: str | None) -> None:
    if key is not None and (not key or len(key) > idempotency.MAX_KEY_LENGTH):
        raise ValidationError({"Idempotency-Key": [f"1-{idempotency.MAX_KEY_LENGTH} characters."]})


def claim_key(user: User, key: str | None, body: Any) -> idempotency.Claim | None:
    """Claim the request's Idempotency-Key (None without one), or raise the API's answer."""
    if key is None:
        return None
    check_key(key)
    try:
        return idempotency.claim(user, key, body)
    except idempotency.KeyInFlight:
        raise Conflict("A request with this Idempotency-Key is still in flight.") from None
    except idempotency.KeyReused:
        raise Unprocessable("This Idempotency-Key was used with a different body.") from None
    except idempotency.KeyMessageDeleted:
        raise NotFound(MESSAGE_DELETED) from None


def _users_named(names: set[str]) -> dict[str, int]:
    """The ids of the users with these usernames (one query)."""
    if not names:
        return {}
    model = get_user_model()
    field = model.USERNAME_FIELD
    if connection.vendor != "postgresql":
        return dict(model.objects.filter(**{f"{field}__in": names}).values_list(field, "pk"))
    # One array parameter: a batch names up to a thousand users, and the ORM's IN list is a
    # new query text with a parameter to quote per name.
    quote = connection.ops.quote_name
    opts = model._meta
    name_column = quote(str(model._meta.get_field(field).get_attname_column()[1]))  # type: ignore[union-attr]
    sql = (
        f"SELECT {name_column}, {quote(opts.pk.column)} "
        f"FROM {quote(opts.db_table)} WHERE {name_column} = ANY(%s::text[])"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [pg_arrays.literal(names)])
        return dict(cursor.fetchall())


def message_from(fields: dict[str, Any], publisher: User, message_id: uuid.UUID | None = None) -> Message:
    """The message a publish's validated fields (see `validated`) ask for, not yet stored."""
    return new_message(
        message_id=message_id,
        topic=fields["topic"],
        user_id=fields["user_id"],
        broadcast=bool(fields["broadcast"]),
        event=fields["event"] or "",
        payload=fields["payload"],
        publisher=publisher,
        origin_instance=settings.RT_INSTANCE_ID,
    )


def validated(
    body: Any, fields: dict[str, Any] | None, users: dict[str, int]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(fields, {}) for a valid publish body, or (None, DRF's field errors). The fields' `user` is
    the recipient's username and `user_id` its id (both None without one).

    A plainly valid body (`fields`, from `plainly_valid`) skips DRF, its recipient's id found in
    `users`; anything else goes through PublishSerializer, which says what is wrong."""
    if fields is not None:
        name = fields["user"]
        if name is None:
            return {**fields, "user_id": None}, {}
        recipient = users.get(name)
        if recipient is not None:
            return {**fields, "user_id": recipient}, {}
    serializer = PublishSerializer(data=body)
    if serializer.is_valid():
        data = serializer.validated_data
        user = data.get("user")
        return {
            "topic": data.get("topic"),
            "user": user.get_username() if user is not None else None,
            "user_id": user.pk if user is not None else None,
            "broadcast": bool(data.get("broadcast")),
            "event": data.get("event") or "",
            "payload": data.get("payload"),
        }, {}
    return None, serializer.errors


class PublishOne:
    """`POST /api/v1/messages/`."""

    def __init__(self, user: User, body: Any, key: str | None, *, plain: Any = None) -> None:
        self.user = user
        self.body = body
        self.key = key
        self.plain_fields: dict[str, Any] | None = plain
        self.claim: idempotency.Claim | None = None
        self.message: Message | None = None
        self.recipient: str | None = None
        self.answer: dict[str, Any] | None = None  # a replay, answered without publishing
        self.failure: BrokerUnavailable | None = None
        # When handled together with others (`accept_together`...): its error, or its answer.
        self.error: APIException | None = None
        self.result: dict[str, Any] | None = None

    @staticmethod
    def plain(body: Any) -> dict[str, Any] | None:
        """The body's fields if it is plainly valid (see `plainly_valid`), else None."""
        return plainly_valid(body)

    @property
    def record(self) -> IdempotencyKey | None:
        return self.claim.record if self.claim is not None else None

    def recipient_names(self) -> set[str]:
        """The username to look up for a plainly valid body (`check` takes the users found)."""
        if self.plain_fields is None:
            self.plain_fields = plainly_valid(self.body)
        plain = self.plain_fields
        return {plain["user"]} if plain is not None and plain["user"] is not None else set()

    def check(self, users: dict[str, Any]) -> dict[str, Any]:
        """The body's fields, or raise DRF's 400 (413 for a payload over the limit)."""
        fields, errors = validated(self.body, self.plain_fields, users)
        if fields is None:
            if too_large(errors):
                raise PayloadTooLarge(f"`payload` is larger than {settings.RT_MAX_PAYLOAD_BYTES} bytes.")
            raise ValidationError(errors)
        self.recipient = fields["user"]
        return fields

    def claim_or_replay(self) -> None:
        """Claim the Idempotency-Key; a finished request with it becomes this one's `answer`."""
        self.claim = claim_key(self.user, self.key, self.body)
        if self.claim is not None and self.claim.replay is not None:
            replay = selectors.visible_messages(self.user).filter(pk=self.claim.replay.pk).first()
            if replay is None:  # deleted since the claim
                raise NotFound(MESSAGE_DELETED)
            self.answer = dict(MessageSerializer(replay).data)

    def new_message(self, fields: dict[str, Any]) -> Message:
        return message_from(fields, self.user)

    def accept(self) -> None:
        """Validate, claim the key, store the message numbered in its stream (sync)."""
        fields = self.check(_users_named(self.recipient_names()))
        self.claim_or_replay()
        if self.answer is not None:
            return
        record = self.record
        try:
            with transaction.atomic():
                message = self.new_message(fields)
                if record is not None:
                    # Committed with the message: from here on a retry can only find this one.
                    idempotency.attach(record, message)
                streams.number([message])  # last: the stream stays locked until the commit
                message.save(force_insert=True)
                self.message = message
        except BaseException:
            self.message = None
            if record is not None:
                idempotency.release(record)
            raise

    async def publish(self) -> None:
        """Publish the stored message, confirmed (async, on the event loop)."""
        if self.message is None:
            return
        try:
            await publish_now(self.message)
        except BrokerUnavailable as exc:
            self.failure = exc

    def finish(self) -> dict[str, Any]:
        """Record the broker's answer; the 202's record, or raise the 503 (sync)."""
        if self.answer is not None:
            return self.answer
        message = self.message
        assert message is not None, "accept() first"
        record = self.record
        if self.failure is not None:
            exc = self.failure
            try:
                mark_failed(message, f"broker unavailable: {exc}", sent=exc.maybe_taken)
            finally:
                if record is not None:
                    idempotency.release(record)
            raise BrokerUnavailableError()
        try:
            mark_published([message])
        finally:
            # Whatever failed after the broker took it (recording the confirm, say), the key
            # stays with this message: a retry answers with it and publishes nothing.
            if record is not None:
                idempotency.complete(record, message)
        return message_record(message, self.recipient)


class PublishBatch:
    """`POST /api/v1/messages/batch/`: all or nothing, one transaction, a few broker messages."""

    def __init__(self, user: User, body: Any, key: str | None, *, plain: Any = None) -> None:
        self.user = user
        self.body = body
        self.key = key
        self.plain_items: list[dict[str, Any] | None] | None = plain
        self.claim: idempotency.Claim | None = None
        self.messages: list[Message] = []
        self.recipients: list[str | None] = []
        self.answer: dict[str, Any] | None = None
        self.failed: list[tuple[list[Message], BrokerUnavailable]] = []

    @staticmethod
    def plain(body: Any) -> list[dict[str, Any] | None] | None:
        """Each item's fields if the whole batch is plainly valid (see `plainly_valid`), else None."""
        if type(body) is not dict or body.keys() != {"messages"}:
            return None
        items = body["messages"]
        if type(items) is not list or not 0 < len(items) <= BATCH_MAX_ITEMS:
            return None
        plain = [plainly_valid(item) for item in items]
        return None if None in plain else plain

    @property
    def record(self) -> IdempotencyKey | None:
        return self.claim.record if self.claim is not None else None

    def items(self) -> list[Any]:
        body = self.body
        if not isinstance(body, dict):
            raise ValidationError({"non_field_errors": ["Expected a JSON object."]})
        unknown = sorted(set(body) - {"messages"})
        if unknown:
            raise ValidationError({name: ["Unknown field."] for name in unknown})
        items = body.get("messages")
        if not isinstance(items, list) or not 0 < len(items) <= BATCH_MAX_ITEMS:
            raise ValidationError({"messages": [f"A list of 1 to {BATCH_MAX_ITEMS} messages."]})
        return items

    def accept(self) -> None:
        """Validate every item (a 400 lists each item's errors), claim the key, store them all
        numbered in one transaction: one numbering statement, one COPY (sync)."""
        items = self.items()
        plain = self.plain_items if self.plain_items is not None else [plainly_valid(item) for item in items]
        users = _users_named({fields["user"] for fields in plain if fields is not None and fields["user"]})
        targets: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for item, item_plain in zip(items, plain, strict=True):
            fields, item_errors = validated(item, item_plain, users)
            errors.append(item_errors)
            if fields is not None:
                targets.append(fields)
        if len(targets) != len(items):
            raise ValidationError({"messages": errors})
        self.claim = claim_key(self.user, self.key, self.body)
        if self.claim is not None and self.claim.replay is not None:
            self.answer = {"messages": batch_records(self.user, self.claim.replay)}
            return
        ids = batch_ids(len(targets))
        for message_id, fields in zip(ids, targets, strict=True):
            self.messages.append(message_from(fields, self.user, message_id))
            self.recipients.append(fields["user"])
        record = self.record
        try:
            with transaction.atomic():
                if record is not None:  # first: the streams stay locked from their numbering on
                    idempotency.attach(record, self.messages[0])
                store_messages(self.messages)  # numbered in list order: a stream keeps request order
        except BaseException:
            if record is not None:
                idempotency.release(record)
            raise

    async def publish(self) -> None:
        """Publish them all, several per broker message, each confirmed (async)."""
        if self.messages:
            self.failed = await publish_many(self.messages)

    def finish(self) -> dict[str, Any]:
        """Record what the broker confirmed; the 202's records in request order, or the 503 (sync).

        All confirmed: all `published`. None confirmed: all `failed`, seqs given back, key
        forgotten, 503. Some confirmed (the broker went away mid-batch): those are `published`,
        the others stay `accepted` (stored, so the sweeper publishes them; web instances fill the
        gap from the database sooner), and the answer is 202: every message is durably accepted.
        """
        if self.answer is not None:
            return self.answer
        record = self.record
        messages = self.messages
        if self.failed:
            unconfirmed = {m.id for members, _ in self.failed for m in members}
            if len(unconfirmed) == len(messages):
                self._fail_all(record)
            for message in messages:
                if message.id in unconfirmed:
                    message.published_at = None
            confirmed = [m for m in messages if m.id not in unconfirmed]
        else:
            confirmed = messages
        try:
            if confirmed:
                mark_published(confirmed)
        finally:
            if record is not None:
                idempotency.complete(record, messages[0])
        times: dict[Any, str | None] = {}
        return {
            "messages": [
                message_record(message, recipient, times)
                for message, recipient in zip(messages, self.recipients, strict=True)
            ]
        }

    def _fail_all(self, record: IdempotencyKey | None) -> None:
        reason = f"broker unavailable: {self.failed[0][1]}"
        maybe_taken = [m for members, exc in self.failed if exc.maybe_taken for m in members]
        never_sent = [m for members, exc in self.failed if not exc.maybe_taken for m in members]
        try:
            if maybe_taken:
                mark_batch_failed(maybe_taken, reason, sent=True)
            if never_sent:
                mark_batch_failed(never_sent, reason, sent=False)
        finally:
            if record is not None:
                idempotency.release(record)
        raise BrokerUnavailableError()


def batch_records(user: User, first: Message) -> list[dict[str, Any]]:
    """The records of the batch whose first message is `first`, as they stand now, in request order."""
    low, high = batch_id_range(first.pk)
    messages = selectors.visible_messages(user).filter(id__gte=low, id__lte=high).order_by("id")
    records = list(MessageSerializer(messages, many=True).data)
    if not records:
        raise NotFound(MESSAGE_DELETED)
    return records


# --- single publishes that arrive together, stored and published together -----------------------


def accept_together(flows: list[PublishOne]) -> None:
    """`accept` for many single publishes at once (sync, one database hop): one query for their
    recipients, then ONE transaction for their keys and messages (one numbering statement, one
    COPY). A request that fails alone (bad input, its key in flight or reused) keeps its error in
    `error`; a database error fails them all (raised; the transaction takes the keys back too).

    Keys are claimed in (user, key) order and inside the transaction, before the streams are
    numbered (in name order): every process takes those locks in one order, so two groups can
    wait for each other but never deadlock.
    """
    names: set[str] = set()
    for flow in flows:
        names |= flow.recipient_names()
    users = _users_named(names)
    checked: list[tuple[PublishOne, dict[str, Any]]] = []
    for flow in flows:
        try:
            checked.append((flow, flow.check(users)))
        except APIException as exc:
            flow.error = exc
    with transaction.atomic():
        for flow, _ in sorted(checked, key=lambda pair: (pair[0].user.pk, pair[0].key or "")):
            if flow.key is None:
                continue
            try:
                with transaction.atomic():
                    flow.claim_or_replay()
            except APIException as exc:
                flow.claim = None
                flow.error = exc
        fresh = [(flow, fields) for flow, fields in checked if flow.error is None and flow.answer is None]
        for flow, fields in fresh:
            flow.message = flow.new_message(fields)
        for flow, _ in fresh:
            record = flow.record
            if record is not None and flow.message is not None:
                idempotency.attach(record, flow.message)
        if fresh:  # last: the streams stay locked from their numbering to the commit
            store_messages([flow.message for flow, _ in fresh if flow.message is not None])


async def publish_together(flows: list[PublishOne]) -> None:
    """Publish the messages of many single publishes, several per broker message (async)."""
    by_id = {flow.message.id: flow for flow in flows if flow.message is not None}
    if not by_id:
        return
    for members, exc in await publish_many([flow.message for flow in by_id.values() if flow.message]):
        for message in members:
            by_id[message.id].failure = exc


def finish_together(flows: list[PublishOne]) -> None:
    """`finish` for many (sync, one database hop): one update marks the confirmed ones published
    and one completes their keys; the others are `failed`, their seqs given back where nothing
    was sent, their keys forgotten, their requests a 503. Each flow's answer is in `result`."""
    confirmed = [flow for flow in flows if flow.message is not None and flow.failure is None]
    unconfirmed = [flow for flow in flows if flow.message is not None and flow.failure is not None]
    if unconfirmed:
        reason = f"broker unavailable: {unconfirmed[0].failure}"
        maybe = [
            f.message for f in unconfirmed if f.message is not None and f.failure and f.failure.maybe_taken
        ]
        never = [
            f.message
            for f in unconfirmed
            if f.message is not None and not (f.failure and f.failure.maybe_taken)
        ]
        try:
            if maybe:
                mark_batch_failed(maybe, reason, sent=True)
            if never:
                mark_batch_failed(never, reason, sent=False)
        finally:
            idempotency.release_many([f.record for f in unconfirmed if f.record is not None])
        for flow in unconfirmed:
            flow.error = BrokerUnavailableError()
    if confirmed:
        # One commit, which need not wait for the disk (see mark_published): a key left
        # unfinished by a crash is completed by its next claim, since its message is not failed.
        with transaction.atomic():
            mark_published([flow.message for flow in confirmed if flow.message is not None])
            idempotency.complete_many([flow.record for flow in confirmed if flow.record is not None])
    for flow in confirmed:
        assert flow.message is not None
        flow.result = message_record(flow.message, flow.recipient)
    for flow in flows:
        if flow.answer is not None:
            flow.result = flow.answer
