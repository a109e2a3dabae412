"""An Idempotency-Key retry never publishes twice, whatever failed after the broker confirmed.

The database fault is real: a PostgreSQL trigger refuses to record the confirm, as a database
that failed at that moment would.
"""

import datetime
import json

import httpx
import pytest
from channels.db import database_sync_to_async
from django.core.asgi import get_asgi_application
from django.db import connection
from django.test import AsyncClient
from django.utils import timezone

from notifications.api.fast_publish import FastPublish
from notifications.models import IdempotencyKey, Message
from notifications.services import idempotency
from tests.test_consumer import connect, request

pytestmark = [
    pytest.mark.usefixtures("bridge"),
    pytest.mark.skipif("connection.vendor != 'postgresql'", reason="the fault is a PostgreSQL trigger"),
]

REFUSE_CONFIRM = """
CREATE OR REPLACE FUNCTION rt_test_refuse_confirm() RETURNS trigger AS $$
BEGIN
  IF NEW.status = 'published' THEN RAISE EXCEPTION 'test fault: cannot record the confirm'; END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER rt_test_refuse_confirm BEFORE UPDATE ON notifications_message
  FOR EACH ROW EXECUTE FUNCTION rt_test_refuse_confirm();
"""
ALLOW_CONFIRM = "DROP TRIGGER rt_test_refuse_confirm ON notifications_message"


def _sql(statement: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(statement)


async def _post(user, body, key, via="view"):
    """POST through the DRF view (Django's test client) or through the fast path in front of it."""
    headers = {"Authorization": f"Token {user.token}", "Idempotency-Key": key}
    if via == "view":
        return await AsyncClient(raise_request_exception=False).post(
            "/api/v1/messages/", data=json.dumps(body), content_type="application/json", headers=headers
        )
    app = FastPublish(get_asgi_application())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as http:
        return await http.post("/api/v1/messages/", json=body, headers=headers)


@pytest.mark.parametrize("via", ["view", "fast path"])
async def test_a_retry_after_a_failed_confirm_record_publishes_nothing_new(users, via):
    bob, _ = await connect("bob")
    assert (await request(bob, {"type": "subscribe", "topic": "orders"}))["type"] == "subscribed"
    body = {"topic": "orders", "event": "e", "payload": {"n": 1}}

    await database_sync_to_async(_sql)(REFUSE_CONFIRM)
    try:
        first = await _post(users["alice"], body, "k-fault", via)
        assert first.status_code == 500, first.content
        assert "Traceback" not in first.content.decode()
    finally:
        await database_sync_to_async(_sql)(ALLOW_CONFIRM)
    delivered = await bob.receive_json_from(timeout=5)  # the broker had it: it was delivered

    again = await _post(users["alice"], body, "k-fault", via)
    assert again.status_code == 202, again.content
    assert again.json()["id"] == delivered["id"]
    assert await bob.receive_nothing(timeout=0.5)
    assert await database_sync_to_async(Message.objects.filter(topic="orders").count)() == 1
    await bob.disconnect()


def _abandoned_key(user_name: str, status: str) -> tuple[IdempotencyKey, Message]:
    """A key whose request died after its message was stored (never completed, long ago)."""
    from django.contrib.auth.models import User

    user = User.objects.get(username=user_name)
    message = Message.objects.create(
        topic="orders", event="e", payload={"n": 2}, status=status, publisher=user
    )
    body = {"topic": "orders", "event": "e", "payload": {"n": 2}}
    key = IdempotencyKey.objects.create(
        user=user, key="k-crash", request_hash=idempotency.request_hash(body), message=message
    )
    long_ago = timezone.now() - idempotency.IN_FLIGHT_LIMIT - datetime.timedelta(seconds=5)
    IdempotencyKey.objects.filter(pk=key.pk).update(created_at=long_ago)
    return key, message


async def test_a_retry_after_a_crash_before_the_key_was_completed_answers_with_its_message(users):
    _, message = await database_sync_to_async(_abandoned_key)("alice", Message.Status.ACCEPTED)
    again = await _post(users["alice"], {"topic": "orders", "event": "e", "payload": {"n": 2}}, "k-crash")
    assert again.status_code == 202, again.content
    assert again.json()["id"] == str(message.id)
    assert await database_sync_to_async(Message.objects.count)() == 1
