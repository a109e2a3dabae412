"""`new_message` builds a message from positional values (faster): it must equal the keyword form."""

import uuid

from django.contrib.auth.models import User
from django.db.models.signals import post_init

from notifications.models import InboundFrame, Message
from notifications.services.messages import new_message

COLUMNS = [field.attname for field in Message._meta.concrete_fields if not field.primary_key]


def as_keywords(**fields: object) -> Message:
    return Message(**{name: value for name, value in fields.items() if value is not None})


def columns(message: Message) -> dict[str, object]:
    return {name: getattr(message, name) for name in COLUMNS}


def test_every_column_is_what_keyword_construction_gives() -> None:
    inbound = uuid.uuid4()
    cases = [
        {"topic": "orders", "event": "order.shipped", "payload": {"order": 42}},
        {"user_id": 7, "event": "notice", "payload": [1, "two", None], "origin_instance": "web-1"},
        {"broadcast": True, "event": "maintenance", "payload": None},
        {"user_id": 3, "source_inbound_id": inbound, "origin_instance": "worker-2", "payload": "hi"},
    ]
    for fields in cases:
        built = new_message(**fields)  # type: ignore[arg-type]
        assert columns(built) == columns(as_keywords(**fields)), fields
        assert built.id is not None and built._state.adding and built._state.db is None


def test_related_objects_give_their_ids_and_stay_cached() -> None:
    recipient, publisher = User(pk=5, username="alice"), User(pk=9, username="backend")
    frame = InboundFrame(id=uuid.uuid4(), event="echo")
    built = new_message(user=recipient, publisher=publisher, source_inbound=frame, event="x")
    assert (built.user_id, built.publisher_id, built.source_inbound_id) == (5, 9, frame.id)
    assert built.user is recipient and built.publisher is publisher and built.source_inbound is frame


def test_each_message_gets_its_own_id_and_status() -> None:
    first, second = new_message(topic="t"), new_message(topic="t")
    assert first.id != second.id
    assert first.status == Message.Status.ACCEPTED and first.seq is None and first.stream == ""


def test_init_signal_receivers_still_hear_of_each_message() -> None:
    heard: list[Message] = []

    def receiver(sender: type, instance: Message, **kwargs: object) -> None:
        heard.append(instance)

    post_init.connect(receiver, sender=Message)
    try:
        built = new_message(topic="t", event="e", payload=1)
    finally:
        post_init.disconnect(receiver, sender=Message)
    assert heard == [built]
    assert columns(built) == columns(as_keywords(topic="t", event="e", payload=1))
