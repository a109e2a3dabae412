"""The admin answers the operator's questions: every record findable, searchable, filterable."""

import uuid

import pytest
from django.contrib.auth.models import User
from django.urls import reverse

from notifications.models import Delivery, InboundFrame, Message, Topic
from tests.support.records import remove_user_row


@pytest.fixture
def admin_client(client, db):
    admin = User.objects.create_superuser("root", password="x")
    client.force_login(admin)
    return client


@pytest.fixture
def records(db):
    bob = User.objects.create_user("bob")
    message = Message.objects.create(
        topic="orders", event="order.shipped", payload={"order": 42}, status="published"
    )
    Delivery.objects.create(
        message=message, user=bob, connection="c-1", instance="web-2", delivered_at=message.created_at
    )
    frame = InboundFrame.objects.create(user=bob, event="echo", payload={"x": 1}, status="dead", error="boom")
    Topic.objects.create(name="ops")
    return message, frame


@pytest.mark.parametrize("model", ["message", "delivery", "inboundframe", "topic"])
def test_changelists_render_with_search_and_filters(admin_client, records, model):
    url = reverse(f"admin:notifications_{model}_changelist")
    assert admin_client.get(url).status_code == 200
    assert admin_client.get(url, {"q": "bob"}).status_code == 200


def test_a_message_is_found_by_id_and_its_deliveries_by_user(admin_client, records):
    message, frame = records
    found = admin_client.get(reverse("admin:notifications_message_changelist"), {"q": str(message.id)})
    assert str(message.id) in found.content.decode()
    missing = admin_client.get(reverse("admin:notifications_message_changelist"), {"q": str(uuid.uuid4())})
    assert str(message.id) not in missing.content.decode()
    deliveries = admin_client.get(reverse("admin:notifications_delivery_changelist"), {"q": "bob"})
    assert "web-2" in deliveries.content.decode()
    detail = admin_client.get(reverse("admin:notifications_message_change", args=[message.id]))
    assert detail.status_code == 200 and "c-1" in detail.content.decode()
    dead = admin_client.get(reverse("admin:notifications_inboundframe_changelist"), {"status__exact": "dead"})
    assert str(frame.id) in dead.content.decode()


def test_records_whose_user_row_is_gone_still_render(admin_client, records):
    """A message and delivery naming a user deleted mid-publish (links the database does not
    check) show no user, in the lists and on the message's page."""
    message, _ = records
    carol = User.objects.create_user("carol")
    Message.objects.filter(pk=message.pk).update(user=carol, publisher=carol)
    Delivery.objects.filter(message=message).update(user=carol)
    remove_user_row("carol")
    for model in ("message", "delivery"):
        listed = admin_client.get(reverse(f"admin:notifications_{model}_changelist"))
        assert listed.status_code == 200 and str(message.id) in listed.content.decode()
    detail = admin_client.get(reverse("admin:notifications_message_change", args=[message.id]))
    assert detail.status_code == 200 and "c-1" in detail.content.decode()


def test_the_log_is_read_only(admin_client, records):
    message, _ = records
    assert admin_client.get(reverse("admin:notifications_message_add")).status_code == 403
    response = admin_client.post(
        reverse("admin:notifications_message_change", args=[message.id]), {"event": "forged"}
    )
    assert response.status_code == 403
    message.refresh_from_db()
    assert message.event == "order.shipped"
