"""API shapes (CONTRACT §3): every request and answer body of the API, one class each."""

import datetime
import re
from typing import Any

from django.contrib.auth import get_user_model
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from notifications.models import Delivery, InboundFrame, Message, linked
from notifications.services.messages import id_text
from notifications.services.payloads import PayloadRejected, check_payload, may_hold_rounded_integers
from notifications.services.streams import wire_name
from notifications.services.topics import TOPIC_MAX_LENGTH, TOPIC_PATTERN, TOPIC_RULE, is_valid_topic_name

EVENT_PATTERN = re.compile(r"^[A-Za-z0-9_.:/-]{1,100}$")


class PayloadField(serializers.JSONField):
    """Any JSON value within the payload rules (size, depth, encodable, no U+0000).

    The rules are checked before DRF's own JSONField check, which re-encodes with Python's json
    and would fail with a RecursionError (a 500) on a deep enough value.
    """

    def to_internal_value(self, data):
        try:
            check_payload(data)
        except PayloadRejected as exc:
            raise serializers.ValidationError(
                exc.detail[0].upper() + exc.detail[1:] + ".", code=exc.code
            ) from None
        return data


def too_large(errors: dict) -> bool:
    """Whether a serializer's errors include a payload over RT_MAX_PAYLOAD_BYTES (a 413, not a 400)."""
    return any(getattr(error, "code", None) == "too_large" for error in errors.get("payload", ()))


class PublishSerializer(serializers.Serializer):
    topic = serializers.CharField(required=False, allow_null=True, max_length=200, trim_whitespace=False)
    user = serializers.CharField(required=False, allow_null=True, max_length=150, trim_whitespace=False)
    broadcast = serializers.BooleanField(required=False, default=False)
    event = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)
    payload = PayloadField(required=False, allow_null=True, default=None)

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)

    def validate_topic(self, value):
        if value is not None and not is_valid_topic_name(value):
            raise serializers.ValidationError(f"A topic is {TOPIC_RULE}.")
        return value

    def validate_user(self, value):
        if value is None:
            return None
        user = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: value}).first()
        if user is None:
            raise serializers.ValidationError(f"No user named {value!r}.")
        return user

    def validate_event(self, value):
        if value and not EVENT_PATTERN.match(value):
            raise serializers.ValidationError("An event is 1-100 characters of letters, digits and _ . : / -")
        return value

    def validate(self, attrs):
        targets = [name for name in ("topic", "user") if attrs.get(name) is not None]
        if attrs.get("broadcast"):
            targets.append("broadcast")
        if len(targets) != 1:
            raise serializers.ValidationError(
                {"non_field_errors": ["Give exactly one of `topic`, `user` or `broadcast: true`."]}
            )
        return attrs


PUBLISH_FIELDS = frozenset(PublishSerializer._declared_fields)
# The longest username PublishSerializer takes (Django's own limit).
USERNAME_MAX_LENGTH = 150


def plainly_valid(body: Any) -> dict[str, Any] | None:
    """The fields of a publish body that is plainly valid, checked without DRF; None when
    PublishSerializer must decide (and explain what is wrong).

    Accepts only bodies PublishSerializer accepts, with the same values, in a tenth of the time:
    the fast publish path and the batch endpoint use it, and hand whatever it refuses to the
    serializer. `user` stays a username here: the caller looks it up (and an unknown one goes to
    the serializer too). Anything the serializer would coerce (a number as a topic, "true" as
    broadcast, spaces around an event) is left to it.
    """
    if type(body) is not dict or not body.keys() <= PUBLISH_FIELDS:
        return None
    topic = body.get("topic")
    user = body.get("user")
    broadcast = body.get("broadcast", False)
    event = body.get("event", "")
    payload = body.get("payload")
    if topic is not None and not (type(topic) is str and is_valid_topic_name(topic)):
        return None
    if user is not None and not (type(user) is str and 0 < len(user) <= USERNAME_MAX_LENGTH and _plain(user)):
        return None
    if type(broadcast) is not bool or type(event) is not str:
        return None
    if event and not EVENT_PATTERN.fullmatch(event):
        return None
    if (topic is not None) + (user is not None) + broadcast != 1:
        return None
    if payload is not None:
        try:
            encoded = check_payload(payload)
        except PayloadRejected:
            return None
        if may_hold_rounded_integers(encoded):
            return None  # orjson may have read an integer past 64 bits as a float: let DRF's parser tell
    return {"topic": topic, "user": user, "broadcast": broadcast, "event": event, "payload": payload}


def _plain(text: str) -> bool:
    """No U+0000 and no lone surrogate (DRF's CharField refuses both)."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def iso_datetime(value: datetime.datetime | None) -> str | None:
    """A datetime as DRF writes it (ISO 8601, UTC as `Z`)."""
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def message_record(
    message: Message, username: str | None, times: dict[Any, str | None] | None = None
) -> dict[str, Any]:
    """What MessageSerializer gives for a message just stored (no deliveries yet), built directly:
    the publish paths answer with it, many at a time for a batch. `username` is its recipient's;
    `times` caches formatted datetimes across the records of one answer (a batch's messages
    share their creation and publication times)."""
    if times is None:
        times = {}
    created, published = message.created_at, message.published_at
    if created not in times:
        times[created] = iso_datetime(created)
    if published not in times:
        times[published] = iso_datetime(published)
    return {
        "id": id_text(message),
        "topic": message.topic,
        "user": username,
        "broadcast": message.broadcast,
        "event": message.event,
        "payload": message.payload,
        "status": str(message.status),
        "created_at": times[created],
        "published_at": times[published],
        "stream": wire_name(message.stream) if message.stream else None,
        "seq": message.seq,
        "deliveries": [],
    }


def username_of(record: Any) -> str | None:
    """The username of a record's `user`, or None if it has none or its row is gone
    (`models.linked`)."""
    user = linked(record, "user")
    return user.get_username() if user is not None else None


class DeliverySerializer(serializers.ModelSerializer):
    user = serializers.SerializerMethodField()

    class Meta:
        model = Delivery
        fields = ["user", "connection", "instance", "delivered_at", "acked_at"]

    def get_user(self, delivery) -> str | None:
        return username_of(delivery)


class StreamMessageSerializer(serializers.ModelSerializer):
    """A message record as a stream's history lists it: everything but its delivery log."""

    user = serializers.SerializerMethodField()
    stream = serializers.SerializerMethodField()
    payload = serializers.JSONField()

    class Meta:
        model = Message
        fields = [
            "id",
            "topic",
            "user",
            "broadcast",
            "event",
            "payload",
            "status",
            "created_at",
            "published_at",
            "stream",
            "seq",
        ]

    def get_user(self, message) -> str | None:
        return username_of(message)

    def get_stream(self, message) -> str | None:
        """As frames name it: `topic:T`, `user` (the recipient's own) or `broadcast`."""
        return wire_name(message.stream) if message.stream else None


class MessageSerializer(StreamMessageSerializer):
    deliveries = DeliverySerializer(many=True, read_only=True)

    class Meta(StreamMessageSerializer.Meta):
        fields = [*StreamMessageSerializer.Meta.fields, "deliveries"]


@extend_schema_field(
    {"type": "string", "minLength": 1, "maxLength": TOPIC_MAX_LENGTH, "pattern": TOPIC_PATTERN.pattern}
)
class TopicField(serializers.CharField):
    """A topic name in a query: checked against the topic rule (a 400 that says it), which the
    OpenAPI schema states too, so that generated clients and fuzzers know it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_length=TOPIC_MAX_LENGTH, **kwargs)

    def run_validation(self, data: Any = serializers.empty) -> Any:
        value = super().run_validation(data)
        if not is_valid_topic_name(value):
            raise serializers.ValidationError(f"A topic is {TOPIC_RULE}.")
        return value


class HistoryQuerySerializer(serializers.Serializer):
    topic = TopicField(required=False)
    user = serializers.ChoiceField(required=False, choices=["me"])
    since = serializers.IntegerField(required=False, default=0, min_value=0, max_value=2**63 - 1)
    limit = serializers.IntegerField(required=False, default=100, min_value=1, max_value=1000)

    def validate(self, attrs):
        if ("topic" in attrs) == ("user" in attrs):
            raise serializers.ValidationError(
                {"non_field_errors": ["Give exactly one of `topic` or `user=me`."]}
            )
        return attrs


class HistorySerializer(serializers.Serializer):
    stream = serializers.CharField()
    epoch = serializers.CharField()
    seq = serializers.IntegerField()
    messages = StreamMessageSerializer(many=True)


class InboundFrameSerializer(serializers.ModelSerializer):
    user = serializers.SerializerMethodField()
    payload = serializers.JSONField()

    class Meta:
        model = InboundFrame
        fields = [
            "id",
            "user",
            "event",
            "payload",
            "status",
            "attempts",
            "processed_by",
            "accepted_at",
            "processed_at",
            "error",
        ]

    def get_user(self, frame) -> str | None:
        return username_of(frame)


class TicketSerializer(serializers.Serializer):
    ticket = serializers.CharField()
    expires_in = serializers.IntegerField()


class BatchPublishSerializer(serializers.Serializer):
    """`POST /api/v1/messages/batch/` (for the schema: the view checks the items itself)."""

    messages = serializers.ListField(child=PublishSerializer(), min_length=1, max_length=1000)


class BatchRecordsSerializer(serializers.Serializer):
    messages = MessageSerializer(many=True)
