"""`manage.py prune_realtime`: old records go in small batches, young and unfinished ones stay."""

import datetime
import io

import pytest
from axes.models import AccessLog
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.utils import timezone

from notifications.models import Delivery, IdempotencyKey, InboundFrame, Message
from notifications.services.retention import delete_in_batches, prune

DAY = datetime.timedelta(days=1)


def aged(model, pk, field: str, age: datetime.timedelta) -> None:
    """Set an auto_now_add time in the past (the ORM will not take it at create)."""
    model.objects.filter(pk=pk).update(**{field: timezone.now() - age})


def message(age: datetime.timedelta, status: str = "published", **fields) -> Message:
    record = Message.objects.create(topic="t", event="e", payload={"big": "x" * 100}, status=status, **fields)
    aged(Message, record.pk, "created_at", age)
    return record


def delivery(of: Message, age: datetime.timedelta, connection: str) -> Delivery:
    return Delivery.objects.create(
        message=of, connection=connection, instance="web-1", delivered_at=timezone.now() - age
    )


def frame(age: datetime.timedelta, status: str) -> InboundFrame:
    record = InboundFrame.objects.create(event="echo", payload={}, status=status)
    aged(InboundFrame, record.pk, "accepted_at", age)
    return record


def key(user: User, name: str, age: datetime.timedelta, of: Message | None) -> IdempotencyKey:
    record = IdempotencyKey.objects.create(
        user=user, key=name, request_hash="h", message=of, completed_at=timezone.now()
    )
    aged(IdempotencyKey, record.pk, "created_at", age)
    return record


@pytest.fixture
def world(db):
    """Old and young records of every kind, with the foreign keys between them."""
    user = User.objects.create_user("publisher")
    old_frame = frame(40 * DAY, "processed")
    w = {
        "old_frame": old_frame,
        "old_dead_frame": frame(40 * DAY, "dead"),
        "old_stuck_frame": frame(40 * DAY, "failed"),  # still being retried: kept
        "young_frame": frame(2 * DAY, "processed"),
        "old_message": message(40 * DAY),
        "old_failed_message": message(35 * DAY, status="failed"),
        "old_unpublished": message(40 * DAY, status="accepted"),  # the sweeper's: kept
        # A young reply of an old frame: stays, without its frame.
        "young_reply": message(1 * DAY, source_inbound=old_frame),
    }
    w["old_deliveries"] = [delivery(w["old_message"], 40 * DAY, f"c-{n}") for n in range(5)]
    # Delivered late (a recovery), after the cut-off: goes with its old message.
    w["late_delivery"] = delivery(w["old_message"], 3 * DAY, "c-late")
    w["young_delivery"] = delivery(w["young_reply"], 1 * DAY, "c-young")
    w["old_key"] = key(user, "k-old", 2 * DAY, w["old_message"])
    w["young_key"] = key(user, "k-young", datetime.timedelta(hours=1), w["young_reply"])
    w["old_login"] = AccessLog.objects.create(username="publisher", ip_address="10.0.0.1", user_agent="t")
    AccessLog.objects.filter(pk=w["old_login"].pk).update(attempt_time=timezone.now() - 40 * DAY)
    w["young_login"] = AccessLog.objects.create(username="publisher", ip_address="10.0.0.1", user_agent="t")
    return w


def ids(model) -> set:
    return set(model.objects.values_list("pk", flat=True))


def test_prune_deletes_what_is_old_and_keeps_what_is_young_or_unfinished(world):
    result = prune(30 * DAY, batch_size=2)

    assert ids(Message) == {world["old_unpublished"].pk, world["young_reply"].pk}
    assert ids(Delivery) == {world["young_delivery"].pk}
    assert ids(InboundFrame) == {world["old_stuck_frame"].pk, world["young_frame"].pk}
    assert ids(IdempotencyKey) == {world["young_key"].pk}
    assert ids(AccessLog) == {world["young_login"].pk}
    reply = Message.objects.get(pk=world["young_reply"].pk)
    assert reply.source_inbound_id is None, "its frame is gone; the reply stays"

    assert result.count(Message) == 2
    assert result.count(Delivery) == 6  # five old, and the late one with its old message
    assert result.count(InboundFrame) == 2
    assert result.count(IdempotencyKey) == 1
    assert result.deleted["axes.AccessLog"] == 1

    again = prune(30 * DAY, batch_size=2)
    assert not again.deleted, "a second run finds nothing"


def test_a_deleted_message_leaves_a_young_key_behind_with_no_message(world):
    prune(30 * DAY)
    young_key = IdempotencyKey.objects.get(pk=world["young_key"].pk)
    assert young_key.message_id == world["young_reply"].pk
    Message.objects.filter(pk=world["young_reply"].pk).delete()
    young_key.refresh_from_db()
    assert young_key.message_id is None and young_key.completed_at is not None


def test_each_batch_is_at_most_batch_size_rows(world):
    batches = []
    deleted = delete_in_batches(
        Delivery.objects.filter(delivered_at__lt=timezone.now() - 30 * DAY), 2, on_batch=batches.append
    )
    assert [sum(b.values()) for b in batches] == [2, 2, 1]
    assert deleted["notifications.Delivery"] == 5


def test_less_than_a_day_is_refused(world):
    with pytest.raises(ValueError):
        prune(datetime.timedelta(hours=12))
    with pytest.raises(CommandError):
        call_command("prune_realtime", "--older-than", "0")


def test_the_command_prints_its_counts_and_defaults_to_the_setting(world, settings):
    settings.RT_RETENTION_DAYS = 36  # keeps the failed message (35 days), prunes the 40-day-old ones
    out = io.StringIO()
    call_command("prune_realtime", "--batch-size", "3", stdout=out)
    text = out.getvalue()
    assert "older than 36 days" in text
    for line in (
        "deliveries: 6",
        "messages: 1",
        "inbound frames: 2",
        "idempotency keys: 1",
        "axes.AccessLog: 1",
    ):
        assert line in text, text
    assert Message.objects.filter(pk=world["old_failed_message"].pk).exists()

    out = io.StringIO()
    call_command("prune_realtime", "--older-than", "30", stdout=out)
    assert (
        "messages: 1" in out.getvalue()
        and not Message.objects.filter(pk=world["old_failed_message"].pk).exists()
    )
