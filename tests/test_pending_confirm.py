"""What the sweeper reads instead of an index on Message.status: `PendingConfirm`, one row per store
of messages, deleted when all of them are recorded published; and the record of a confirm is a
HOT update (PostgreSQL rewrites the row in place, no index touched)."""

import datetime

import pytest
from django.contrib.auth.models import User
from django.db import DataError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from notifications.models import Message, PendingConfirm
from notifications.services import unconfirmed
from notifications.services.messages import mark_published, new_message, store_messages

pytestmark = pytest.mark.django_db(transaction=True)


def stored(count: int, topic: str = "pending") -> list[Message]:
    messages = [new_message(topic=topic, event="e", payload={"n": n}) for n in range(count)]
    with transaction.atomic():
        store_messages(messages)
    return messages


def published(messages: list[Message]) -> None:
    now = timezone.now()
    for message in messages:
        message.published_at = now
    with transaction.atomic():
        mark_published(messages)


def aged(messages: list[Message], seconds: float) -> None:
    """Move a store back in time, its row with it (as the sweeper's grace period sees it)."""
    past = timezone.now() - datetime.timedelta(seconds=seconds)
    PendingConfirm.objects.filter(created_at=messages[0].created_at).update(created_at=past)
    Message.objects.filter(id__in=[m.id for m in messages]).update(created_at=past)


def test_a_store_writes_one_row_and_recording_all_of_it_published_deletes_it():
    first, second = stored(3), stored(2)
    assert list(PendingConfirm.objects.values_list("created_at", flat=True).order_by("id")) == [
        first[0].created_at,
        second[0].created_at,
    ]
    published(first)
    assert list(PendingConfirm.objects.values_list("created_at", flat=True)) == [second[0].created_at]


def test_a_store_recorded_published_in_part_keeps_its_row_for_the_sweeper(settings):
    messages = stored(4)
    published(messages[:3])
    assert PendingConfirm.objects.count() == 1
    settings.RT_SWEEP_GRACE_SECONDS = 30
    aged(messages, 60)
    assert [m.id for m in unconfirmed.unconfirmed_messages()] == [messages[3].id]


def test_the_sweeper_finds_old_stores_in_stream_order_and_forgets_the_settled_ones(settings):
    settings.RT_SWEEP_GRACE_SECONDS = 30
    old = stored(3)
    settled = stored(2)
    young = stored(2)
    aged(old, 120)
    aged(settled, 90)
    Message.objects.filter(id__in=[m.id for m in settled]).update(status=Message.Status.FAILED)

    found = unconfirmed.unconfirmed_messages()

    assert [(m.id, m.seq) for m in found] == [(m.id, m.seq) for m in old]
    assert all(m.epoch for m in found)
    # The settled store's row is gone; the old one stays until its messages are recorded; the
    # young one is within its grace period.
    assert set(PendingConfirm.objects.values_list("created_at", flat=True)) == {
        Message.objects.get(id=old[0].id).created_at,
        young[0].created_at,
    }
    published(found)  # read back from the database: no ticket, the next sweep deletes the row
    assert unconfirmed.unconfirmed_messages() == []
    assert list(PendingConfirm.objects.values_list("created_at", flat=True)) == [young[0].created_at]


def _index_definitions(table: str) -> str:
    """What the indexes of `table` hold and filter on (a partial index's predicate too)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", [table])
        return " ".join(row[0].split(" USING ", 1)[1] for row in cursor.fetchall())


def _updates(table: str) -> tuple[int, int]:
    """Rows of `table` updated, and of them rewritten in place, by this backend (counted so far)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = %s", [table]
        )
        return cursor.fetchone()


def test_recording_a_confirm_changes_no_indexed_column_and_rewrites_rows_in_place():
    indexed = _index_definitions("notifications_message")
    assert "stream" in indexed  # (the check reads the definitions)
    assert not [column for column in ("status", "published_at", "error") if column in indexed]
    messages = stored(200, topic="hot")
    now = timezone.now()
    for message in messages:
        message.published_at = now
    with transaction.atomic():
        before = _updates("notifications_message")
        mark_published(messages)
        after = _updates("notifications_message")
    updated, hot = after[0] - before[0], after[1] - before[1]
    assert updated == 200
    assert hot == 200, "each confirmed version fits beside the stored one (the table's fillfactor)"


def test_messages_accepted_before_the_migration_are_the_sweepers(settings):
    """The migration gives messages already `accepted` their rows (one per store time)."""
    from importlib import import_module

    from django.apps import apps

    migration = import_module("notifications.migrations.0009_confirm_without_status_index")
    alice = User.objects.create(username="alice-before")
    old = Message.objects.create(user=alice, event="before", payload={})
    Message.objects.create(user=alice, event="done", payload={}, status=Message.Status.PUBLISHED)
    PendingConfirm.objects.all().delete()

    migration.pending_for_accepted(apps, None)

    assert list(PendingConfirm.objects.values_list("created_at", flat=True)) == [old.created_at]
    settings.RT_SWEEP_GRACE_SECONDS = 0
    assert [m.id for m in unconfirmed.unconfirmed_messages()] == [old.id]


def test_recording_a_confirm_outside_a_transaction_is_one_query_and_all_or_nothing():
    with CaptureQueriesContext(connection) as queries:
        mark_published([])
    assert not queries
    messages = stored(3)
    now = timezone.now()
    for message in messages:
        message.published_at = now
    with CaptureQueriesContext(connection) as queries:
        mark_published(messages)
    assert len(queries) == 1, [q["sql"][:80] for q in queries]
    assert set(Message.objects.values_list("status", flat=True)) == {Message.Status.PUBLISHED}
    assert not PendingConfirm.objects.exists()

    # Two publish times, one of which PostgreSQL refuses: neither update stays.
    again = stored(2, topic="again")
    again[0].published_at, again[1].published_at = now, "not a time"
    with pytest.raises(DataError):
        mark_published(again)
    assert set(Message.objects.filter(topic="again").values_list("status", flat=True)) == {
        Message.Status.ACCEPTED
    }
    assert PendingConfirm.objects.count() == 1
