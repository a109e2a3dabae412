"""Who may do what in the admin: requeueing needs the change permission, the delivery log is
deleted by superusers only, and deleting a message keeps its Idempotency-Key answered."""

import json

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from notifications.models import Delivery, IdempotencyKey, InboundFrame, Message
from notifications.services import idempotency
from tests.conftest import make_user


def staff(username: str, *codenames: str) -> User:
    make_user(username, staff=True)
    user = User.objects.get(username=username)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="notifications", codename__in=codenames)
    )
    return user


def as_user(client, user: User):
    client.force_login(user)
    return client


def dead_frame() -> InboundFrame:
    owner = User.objects.create_user("sender")
    return InboundFrame.objects.create(user=owner, event="echo", payload={"n": 1}, status="dead", attempts=5)


def run_requeue(client, frame: InboundFrame):
    return client.post(
        reverse("admin:notifications_inboundframe_changelist"),
        {"action": "requeue_dead", "_selected_action": [str(frame.id)], "index": "0", "select_across": "0"},
        follow=True,
    )


def offered_actions(client, model: str) -> set[str]:
    response = client.get(reverse(f"admin:notifications_{model}_changelist"))
    assert response.status_code == 200
    form = response.context["action_form"]
    return {name for name, _ in form.fields["action"].choices if name} if form else set()


# --- requeue ---------------------------------------------------------------------------------


def test_requeue_is_not_offered_to_staff_who_may_only_view_frames(client, db):
    viewer = staff("viewer", "view_inboundframe")
    frame = dead_frame()
    as_user(client, viewer)
    assert "requeue_dead" not in offered_actions(client, "inboundframe")
    response = run_requeue(client, frame)
    assert response.status_code == 200
    assert "Stopped requeueing" not in response.content.decode()  # the action never ran
    frame.refresh_from_db()
    assert (frame.status, frame.attempts) == ("dead", 5)


def test_requeue_runs_for_staff_with_the_change_permission(client, users, namespace, publisher):
    """With the broker unreachable, the action's own answer shows that it ran (and changed nothing)."""
    from consumers_app.bridge import InstanceBridge

    publisher(InstanceBridge())  # never connected
    operator = staff("operator", "view_inboundframe", "change_inboundframe")
    frame = dead_frame()
    as_user(client, operator)
    assert "requeue_dead" in offered_actions(client, "inboundframe")
    response = run_requeue(client, frame)
    assert "Stopped requeueing" in response.content.decode()
    frame.refresh_from_db()
    assert frame.status == "dead"


# --- the delivery log --------------------------------------------------------------------------


@pytest.fixture
def delivered(db) -> tuple[Message, Delivery]:
    bob = User.objects.create_user("bob-listener")
    message = Message.objects.create(topic="orders", event="e", payload={}, status="published")
    delivery = Delivery.objects.create(
        message=message, user=bob, connection="c-1", instance="web-1", delivered_at=message.created_at
    )
    return message, delivery


def test_staff_cannot_delete_deliveries_even_with_the_delete_permission(client, delivered):
    message, delivery = delivered
    auditor = staff("auditor", "view_delivery", "delete_delivery", "view_message", "delete_message")
    as_user(client, auditor)
    assert "delete_selected" not in offered_actions(client, "delivery")
    url = reverse("admin:notifications_delivery_delete", args=[delivery.pk])
    assert client.get(url).status_code == 403
    assert client.post(url, {"post": "yes"}).status_code == 403
    # Nor through its message: deleting a message would take its deliveries along.
    message_url = reverse("admin:notifications_message_delete", args=[message.pk])
    assert client.post(message_url, {"post": "yes"}).status_code == 403
    assert Delivery.objects.filter(pk=delivery.pk).exists() and Message.objects.filter(pk=message.pk).exists()


def test_a_superuser_can_delete_a_delivery(client, delivered):
    _, delivery = delivered
    as_user(client, User.objects.create_superuser("root", password="x"))
    assert "delete_selected" in offered_actions(client, "delivery")
    url = reverse("admin:notifications_delivery_delete", args=[delivery.pk])
    assert client.post(url, {"post": "yes"}).status_code == 302
    assert not Delivery.objects.filter(pk=delivery.pk).exists()


# --- a deleted message and its Idempotency-Key ------------------------------------------------------


def publish(client, token: str, body: dict, key: str):
    return client.post(
        "/api/v1/messages/",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Token {token}", "Idempotency-Key": key},
    )


def test_deleting_a_message_keeps_its_key_and_a_retry_publishes_nothing(client, db):
    alice = make_user("alice", can_publish=True)
    body = {"topic": "orders", "event": "order.shipped", "payload": {"order": 42}}
    # The key as an accepted request leaves it (the service functions the API calls).
    claim = idempotency.claim(User.objects.get(username="alice"), "k-1", body)
    message = Message.objects.create(
        topic="orders", event="order.shipped", payload={"order": 42}, status="published"
    )
    idempotency.complete(claim.record, message)

    as_user(client, User.objects.create_superuser("root", password="x"))
    response = client.post(reverse("admin:notifications_message_delete", args=[message.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert not Message.objects.exists()
    key = IdempotencyKey.objects.get(key="k-1")
    assert key.message_id is None and key.completed_at is not None
    client.logout()

    retry = publish(client, alice.token, body, "k-1")
    assert retry.status_code == 404, retry.content
    assert retry.json() == {"detail": "The message published with this Idempotency-Key was deleted."}
    assert not Message.objects.exists(), "a retry must publish nothing"
    # The key still compares bodies: another body with it is still a 422.
    other = publish(client, alice.token, {**body, "payload": {"order": 43}}, "k-1")
    assert other.status_code == 422, other.content
