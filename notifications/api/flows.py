"""Publishing through the API in three steps, shared by the DRF views and the fast ASGI path.

`accept` (sync, one database hop): validate, claim the Idempotency-Key, store the message(s)
numbered in one transaction. `publish` (async, on the event loop): confirmed by the broker.
`finish` (sync, one database hop): record the outcome and build the answer. The DRF views run the
sync steps in their request thread; `fast_publish` runs each in one `database_sync_to_async` hop.
Errors are DRF's exceptions (APIException), so both paths answer with the same shapes.
(Single and batch publishes, alone or grouped: one set of group functions, which a request
alone runs with a group of one, `AloneSteps`.)
"""

import logging
import uuid
from collections.abc import Sequence
from typing import Any, cast

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
from notifications.services import idempotency, pg_arrays
from notifications.services.messages import (
    batch_id_range,
    batch_ids,
    mark_batch_failed,
    mark_published,
    new_message,
    publish_many,
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


def message_from(
    fields: dict[str, Any], publisher: User, message_id: uuid.UUID | None = None, origin: str | None = None
) -> Message:
    """The message a publish's validated fields (see `validated`) ask for, not yet stored.
    `origin` is this instance's RT_INSTANCE_ID (a batch reads the setting once)."""
    return new_message(
        message_id=message_id,
        topic=fields["topic"],
        user_id=fields["user_id"],
        broadcast=bool(fields["broadcast"]),
        event=fields["event"] or "",
        payload=fields["payload"],
        publisher=publisher,
        origin_instance=settings.RT_INSTANCE_ID if origin is None else origin,
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


class AloneSteps:
    """`accept`, `publish` and `finish` of one request on its own (the DRF views): the group
    functions below with a group of one, so a request alone and one grouped on the fast path go
    through the same code."""

    error: APIException | None
    result: dict[str, Any] | None

    def accept(self) -> None:
        """Validate (DRF's 400, or 413 for a payload), claim the Idempotency-Key, and store the
        message(s) numbered in one transaction: one numbering statement, one COPY (sync)."""
        accept_together([cast("Flow", self)])
        if self.error is not None:
            raise self.error

    async def publish(self) -> None:
        """Publish what was stored, several per broker message, each confirmed (async)."""
        await publish_together([cast("Flow", self)])

    def finish(self) -> dict[str, Any]:
        """Record what the broker confirmed; the 202's answer, or raise the 503 (sync).

        A single publish, or a batch none of whose messages the broker confirmed, is `failed`
        (seqs given back where nothing was sent), its key forgotten, its answer a 503. A batch
        confirmed in part keeps the rest `accepted` (the sweeper publishes them; web instances
        fill the gap from the database sooner) and answers 202: every message is durably
        accepted.
        """
        finish_together([cast("Flow", self)])
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class PublishOne(AloneSteps):
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
        self.fields: dict[str, Any] = {}

    # Messages it asks for (to bound a group).
    size = 1

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
        self.fields = fields
        return fields

    def claim_or_replay(self) -> None:
        """Claim the Idempotency-Key; a finished request with it becomes this one's `answer`."""
        self.claim = claim_key(self.user, self.key, self.body)
        if self.claim is not None and self.claim.replay is not None:
            replay = selectors.visible_messages(self.user).filter(pk=self.claim.replay.pk).first()
            if replay is None:  # deleted since the claim
                raise NotFound(MESSAGE_DELETED)
            self.answer = dict(MessageSerializer(replay).data)

    def build(self) -> list[Message]:
        """Its message, not yet stored (after `check`)."""
        self.message = message_from(self.fields, self.user)
        return [self.message]

    def stored(self) -> list[Message]:
        return [self.message] if self.message is not None else []

    def unconfirmed(self, messages: list[Message], exc: BrokerUnavailable) -> None:
        self.failure = exc

    def unconfirmed_messages(self) -> list[tuple[Message, BrokerUnavailable]]:
        return [(self.message, self.failure)] if self.message is not None and self.failure is not None else []

    def answer_records(self, times: dict[Any, str | None]) -> dict[str, Any]:
        assert self.message is not None
        return message_record(self.message, self.recipient, times)


class PublishBatch(AloneSteps):
    """`POST /api/v1/messages/batch/`: all or nothing, one transaction, a few broker messages.

    Alone (the DRF view: `accept`, `publish`, `finish`) or grouped with other requests (the fast
    path: `accept_together`...), through the same steps."""

    def __init__(self, user: User, body: Any, key: str | None, *, plain: Any = None) -> None:
        self.user = user
        self.body = body
        self.key = key
        self.plain_items: list[dict[str, Any] | None] | None = plain
        self.claim: idempotency.Claim | None = None
        self.targets: list[dict[str, Any]] = []
        self.messages: list[Message] = []
        self.recipients: list[str | None] = []
        self.answer: dict[str, Any] | None = None
        self.failed: list[tuple[list[Message], BrokerUnavailable]] = []
        self.error: APIException | None = None
        self.result: dict[str, Any] | None = None

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

    @property
    def size(self) -> int:
        """Messages it asks for (to bound a group)."""
        items = self.body.get("messages") if isinstance(self.body, dict) else None
        return len(items) if isinstance(items, list) else 1

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

    def recipient_names(self) -> set[str]:
        """The usernames its plainly valid items name (`check` takes the users found)."""
        if self.plain_items is None:
            try:
                self.plain_items = [plainly_valid(item) for item in self.items()]
            except ValidationError:
                return set()  # `check` says what is wrong
        return {fields["user"] for fields in self.plain_items if fields is not None and fields["user"]}

    def check(self, users: dict[str, Any]) -> None:
        """Validate every item, or raise DRF's 400 listing each item's errors."""
        items = self.items()
        plain = self.plain_items if self.plain_items is not None else [plainly_valid(item) for item in items]
        targets: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for item, item_plain in zip(items, plain, strict=True):
            fields, item_errors = validated(item, item_plain, users)
            errors.append(item_errors)
            if fields is not None:
                targets.append(fields)
        if len(targets) != len(items):
            raise ValidationError({"messages": errors})
        self.targets = targets

    def claim_or_replay(self) -> None:
        """Claim the Idempotency-Key; a finished request with it becomes this one's `answer`."""
        self.claim = claim_key(self.user, self.key, self.body)
        if self.claim is not None and self.claim.replay is not None:
            self.answer = {"messages": batch_records(self.user, self.claim.replay)}

    def build(self) -> list[Message]:
        """Its messages, not yet stored, with ids that find the batch again (`batch_ids`)."""
        ids = batch_ids(len(self.targets))
        origin = settings.RT_INSTANCE_ID
        self.messages = [
            message_from(fields, self.user, message_id, origin)
            for message_id, fields in zip(ids, self.targets, strict=True)
        ]
        self.recipients = [fields["user"] for fields in self.targets]
        return self.messages

    def stored(self) -> list[Message]:
        return self.messages

    def unconfirmed(self, messages: list[Message], exc: BrokerUnavailable) -> None:
        self.failed.append((messages, exc))

    def unconfirmed_messages(self) -> list[tuple[Message, BrokerUnavailable]]:
        return [(message, exc) for members, exc in self.failed for message in members]

    def answer_records(self, times: dict[Any, str | None]) -> dict[str, Any]:
        """The 202's records, in request order."""
        return {
            "messages": [
                message_record(message, recipient, times)
                for message, recipient in zip(self.messages, self.recipients, strict=True)
            ]
        }


def batch_records(user: User, first: Message) -> list[dict[str, Any]]:
    """The records of the batch whose first message is `first`, as they stand now, in request order."""
    low, high = batch_id_range(first.pk)
    messages = selectors.visible_messages(user).filter(id__gte=low, id__lte=high).order_by("id")
    records = list(MessageSerializer(messages, many=True).data)
    if not records:
        raise NotFound(MESSAGE_DELETED)
    return records


# --- publishes that arrive together, stored and published together ------------------------------

Flow = PublishOne | PublishBatch


def accept_together(flows: Sequence[Flow]) -> None:
    """`accept` for many publishes (single or batch) at once (sync, one database hop): one query
    for their recipients, then ONE transaction for their keys and messages (one numbering
    statement, one COPY). A request that fails alone (bad input, its key in flight or reused)
    keeps its error in `error`; a database error fails them all (raised; the transaction takes
    the keys back too).

    Keys are claimed in (user, key) order and inside the transaction, before the streams are
    numbered (in name order): every process takes those locks in one order, so two groups can
    wait for each other but never deadlock.
    """
    names: set[str] = set()
    for flow in flows:
        names |= flow.recipient_names()
    users = _users_named(names)
    checked: list[Flow] = []
    for flow in flows:
        try:
            flow.check(users)
            checked.append(flow)
        except APIException as exc:
            flow.error = exc
    with transaction.atomic():
        for flow in sorted(checked, key=lambda flow: (flow.user.pk, flow.key or "")):
            if flow.key is None:
                continue
            try:
                with transaction.atomic():
                    flow.claim_or_replay()
            except APIException as exc:
                flow.claim = None
                flow.error = exc
        messages: list[Message] = []
        for flow in checked:
            if flow.error is not None or flow.answer is not None:
                continue
            built = flow.build()
            record = flow.record
            if record is not None:  # the first message finds the request again
                idempotency.attach(record, built[0])
            messages += built
        if messages:  # last: the streams stay locked from their numbering to the commit
            store_messages(messages)  # numbered in list order: a stream keeps request order


async def publish_together(flows: Sequence[Flow]) -> None:
    """Publish the stored messages of many publishes, several per broker message (async); each
    request learns which of its messages the broker did not confirm."""
    owners: dict[uuid.UUID, Flow] = {}
    messages: list[Message] = []
    for flow in flows:
        for message in flow.stored():
            owners[message.id] = flow
            messages.append(message)
    if not messages:
        return
    for members, exc in await publish_many(messages):
        parts: dict[int, tuple[Flow, list[Message]]] = {}
        for message in members:
            owner = owners[message.id]
            parts.setdefault(id(owner), (owner, []))[1].append(message)
        for owner, part in parts.values():
            owner.unconfirmed(part, exc)


def finish_together(flows: Sequence[Flow]) -> None:
    """`finish` for many (sync, one database hop): one update marks the confirmed ones published
    and one completes their keys. A single publish the broker did not confirm, or a batch none of
    whose messages it confirmed, is `failed` (seqs given back where nothing was sent), its key
    forgotten, its request a 503; a batch the broker confirmed in part keeps the rest `accepted`
    (the sweeper publishes them) and answers 202. Each flow's answer is in `result`."""
    confirmed: list[Message] = []
    completed: list[IdempotencyKey] = []
    failed: list[tuple[Message, BrokerUnavailable]] = []
    given_up: list[Flow] = []
    for flow in flows:
        stored = flow.stored()
        if not stored or flow.error is not None:
            continue
        unconfirmed = flow.unconfirmed_messages()
        if len(unconfirmed) == len(stored):
            failed += unconfirmed
            given_up.append(flow)
            continue
        for message, _ in unconfirmed:
            message.published_at = None  # stays `accepted`: the sweeper publishes it
        left_out = {message.id for message, _ in unconfirmed}
        confirmed += [message for message in stored if message.id not in left_out]
        if flow.record is not None:
            completed.append(flow.record)
    if failed:
        reason = f"broker unavailable: {failed[0][1]}"
        try:
            maybe_taken = [message for message, exc in failed if exc.maybe_taken]
            never_sent = [message for message, exc in failed if not exc.maybe_taken]
            if maybe_taken:
                mark_batch_failed(maybe_taken, reason, sent=True)
            if never_sent:
                mark_batch_failed(never_sent, reason, sent=False)
        finally:
            idempotency.release_many([flow.record for flow in given_up if flow.record is not None])
        for flow in given_up:
            flow.error = BrokerUnavailableError()
    if confirmed:
        # One commit, which need not wait for the disk (see mark_published): a key left
        # unfinished by a crash is completed by its next claim, since its message is not failed.
        try:
            if completed:
                with transaction.atomic():
                    mark_published(confirmed)
                    idempotency.complete_many(completed)
            else:
                mark_published(confirmed)  # its own transaction, in one round trip
        except Exception:
            # Whatever failed after the broker took them (recording the confirm, say), the keys
            # stay with their messages: a retry answers with them and publishes nothing.
            _complete_keys_after_failure(completed)
            raise
    times: dict[Any, str | None] = {}
    for flow in flows:
        if flow.answer is not None:
            flow.result = flow.answer
        elif flow.error is None and flow.stored():
            flow.result = flow.answer_records(times)


def _complete_keys_after_failure(records: list[IdempotencyKey]) -> None:
    """Complete the keys on their own when recording the confirm failed; if that fails too (the
    database is down), their next claim completes them once they are no longer in flight."""
    try:
        idempotency.complete_many(records)
    except Exception as exc:
        logger.warning("could not complete %d Idempotency-Keys after a failed record: %s", len(records), exc)
