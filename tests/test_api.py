"""The HTTP API in-process (Django's AsyncClient through the ASGI app), with a live bridge."""

import io
import json
import uuid

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient

from notifications.models import Delivery, IdempotencyKey, Message
from notifications.services.topics import TOPIC_PATTERN
from tests.support.records import MESSAGE_RECORD_FIELDS, remove_user_row

pytestmark = pytest.mark.usefixtures("bridge")


def auth(user) -> dict[str, str]:
    return {"Authorization": f"Token {user.token}"} if user else {}


async def get(user, url):
    return await AsyncClient().get(url, headers=auth(user))


async def post(user, body, **headers):
    data = body if isinstance(body, str) else json.dumps(body)
    return await AsyncClient().post(
        "/api/v1/messages/", data=data, content_type="application/json", headers=auth(user) | headers
    )


async def count(model=Message, **filters) -> int:
    return await database_sync_to_async(model.objects.filter(**filters).count)()


async def test_publish_answers_202_with_the_published_record(users):
    response = await post(
        users["alice"], {"topic": "orders", "event": "order.shipped", "payload": {"order": 42}}
    )
    assert response.status_code == 202, response.content
    record = response.json()
    assert set(record) == MESSAGE_RECORD_FIELDS
    assert record["status"] == "published"
    assert (record["stream"], record["seq"]) == ("topic:orders", 1)
    assert (record["topic"], record["user"], record["broadcast"]) == ("orders", None, False)
    assert record["payload"] == {"order": 42}
    assert record["published_at"] and record["deliveries"] == []


async def test_user_and_broadcast_targets(users):
    to_bob = await post(users["alice"], {"user": "bob", "event": "notice", "payload": {"text": "hi"}})
    assert to_bob.status_code == 202 and to_bob.json()["user"] == "bob"
    everyone = await post(users["alice"], {"broadcast": True, "event": "maintenance", "payload": None})
    assert everyone.status_code == 202 and everyone.json()["broadcast"] is True


async def test_no_credentials_is_401_with_www_authenticate(users):
    response = await post(None, {"topic": "t"})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Token")
    assert "detail" in response.json()
    bad = await AsyncClient(headers={"Authorization": "Token nope"}).post(
        "/api/v1/messages/", data="{}", content_type="application/json"
    )
    assert bad.status_code == 401


async def test_publishing_needs_the_add_message_permission(users):
    response = await post(users["bob"], {"topic": "orders"})
    assert response.status_code == 403
    assert await count() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"event": "x"}, "non_field_errors"),
        ({"topic": "a", "user": "bob"}, "non_field_errors"),
        ({"topic": "a", "broadcast": True}, "non_field_errors"),
        ({"user": "nobody-by-that-name"}, "user"),
        ({"topic": "has space"}, "topic"),
        ({"topic": "a", "event": "bad event!"}, "event"),
        ({"topic": "a", "broadcast": "maybe"}, "broadcast"),
        ({"topic": "a", "colour": "red"}, "colour"),
        (["not", "an", "object"], "non_field_errors"),
    ],
)
async def test_bad_input_is_400_with_field_errors(users, body, field):
    response = await post(users["alice"], body)
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert await count() == 0


async def test_malformed_json_is_400(users):
    response = await post(users["alice"], '{"topic": "a",')
    assert response.status_code == 400
    assert "detail" in response.json()


async def test_oversized_payload_is_413(users, settings):
    settings.RT_MAX_PAYLOAD_BYTES = 1000
    response = await post(users["alice"], {"topic": "a", "payload": "x" * 1001})
    assert response.status_code == 413
    assert "detail" in response.json()
    assert await count() == 0
    huge = await post(users["alice"], {"topic": "a", "payload": "x" * 40_000})
    assert huge.status_code == 413


async def test_idempotency_key_replays_the_same_message(users):
    body = {"topic": "orders", "event": "e", "payload": {"b": 1, "a": 2}}
    first = await post(users["alice"], body, **{"Idempotency-Key": "k-1"})
    reordered = '{"payload": {"a": 2, "b": 1}, "event": "e", "topic": "orders"}'
    again = await post(users["alice"], reordered, **{"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert await count() == 1
    different = await post(users["alice"], {**body, "payload": {"b": 2}}, **{"Idempotency-Key": "k-1"})
    assert different.status_code == 422
    # Keys are per user: staff may use the same key for its own message.
    other = await post(users["staff"], body, **{"Idempotency-Key": "k-1"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


async def test_idempotency_key_in_flight_is_409(users):
    from django.contrib.auth.models import User

    from notifications.services.idempotency import request_hash

    body = {"topic": "orders"}
    alice = await database_sync_to_async(User.objects.get)(username="alice")
    await database_sync_to_async(IdempotencyKey.objects.create)(
        user=alice, key="busy", request_hash=request_hash(body)
    )
    response = await post(users["alice"], body, **{"Idempotency-Key": "busy"})
    assert response.status_code == 409
    assert await count() == 0


async def test_message_record_is_visible_to_its_publisher_and_staff_only(users):
    created = (await post(users["alice"], {"topic": "orders"})).json()
    url = f"/api/v1/messages/{created['id']}/"
    assert (await get(users["alice"], url)).json()["id"] == created["id"]
    assert (await get(users["staff"], url)).status_code == 200
    assert (await get(users["bob"], url)).status_code == 404
    assert (await get(users["alice"], f"/api/v1/messages/{uuid.uuid4()}/")).status_code == 404


def _deliver_to(message_id: str, username: str) -> None:
    from django.contrib.auth.models import User
    from django.utils import timezone

    user = User.objects.get(username=username)
    Delivery.objects.create(
        message_id=message_id, user=user, connection="c-1", instance="web-1", delivered_at=timezone.now()
    )


async def test_deleting_a_user_or_message_through_django_still_clears_their_links(users):
    """The links of messages and deliveries are not checked by the database (models, "Unchecked
    links"): Django's own `on_delete` must still apply when a user or message is deleted."""
    from django.contrib.auth.models import User

    created = (await post(users["alice"], {"user": "bob", "event": "notice"})).json()
    await database_sync_to_async(_deliver_to)(created["id"], "bob")
    await database_sync_to_async(User.objects.filter(username="bob").delete)()
    message = await database_sync_to_async(Message.objects.get)(pk=created["id"])
    delivery = await database_sync_to_async(Delivery.objects.get)(message_id=created["id"])
    assert (message.user_id, delivery.user_id) == (None, None)
    await database_sync_to_async(User.objects.filter(username="alice").delete)()
    assert (await database_sync_to_async(Message.objects.get)(pk=created["id"])).publisher_id is None
    await database_sync_to_async(Message.objects.filter(pk=created["id"]).delete)()
    assert await count(Delivery) == 0


async def test_a_record_whose_user_row_is_gone_reads_as_no_user(users):
    """A user deleted while a message to them was being stored leaves a link to nothing: the
    record still reads, with no user, rather than a 500."""
    created = (await post(users["alice"], {"user": "bob", "event": "notice"})).json()
    await database_sync_to_async(_deliver_to)(created["id"], "bob")
    await database_sync_to_async(remove_user_row)("bob")
    response = await get(users["alice"], f"/api/v1/messages/{created['id']}/")
    assert response.status_code == 200, response.content
    record = response.json()
    assert record["user"] is None
    assert [delivery["user"] for delivery in record["deliveries"]] == [None]


async def test_ticket_endpoint(users, settings):
    settings.RT_TICKET_TTL = 30
    response = await AsyncClient().post("/api/v1/ws-tickets/", headers=auth(users["bob"]))
    assert response.status_code == 200
    assert response.json()["expires_in"] == 30 and response.json()["ticket"]
    assert (await AsyncClient().post("/api/v1/ws-tickets/")).status_code == 401


async def test_schema_docs_health_and_metrics(users):
    client = AsyncClient()
    schema = await client.get("/api/schema/", headers={"Accept": "application/json"})
    assert schema.status_code == 200
    assert "/api/v1/messages/" in schema.content.decode()
    assert (await client.get("/api/docs/")).status_code == 200
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200 and b"rt_broker_connected" in metrics.content


def test_the_schema_states_what_the_api_checks():
    """What a generated client or a fuzzer reads: the answers each path may give, the topic rule,
    and every warning of drf-spectacular fixed (a warning is a guess in the schema)."""
    from django.core.management import call_command

    out = io.StringIO()
    call_command("spectacular", "--validate", "--fail-on-warn", "--format", "openapi-json", stdout=out)
    paths = json.loads(out.getvalue())["paths"]
    for path in ("/api/v1/messages/{id}/", "/api/v1/inbound/{id}/"):
        assert {"200", "404"} <= set(paths[path]["get"]["responses"]), path
    for path in ("/api/v1/presence/", "/api/v1/history/"):
        (topic,) = [p for p in paths[path]["get"]["parameters"] if p["name"] == "topic"]
        assert topic["schema"]["pattern"] == TOPIC_PATTERN.pattern, path
        assert "400" in paths[path]["get"]["responses"], path


async def test_probes_answer_whatever_the_host_header(users):
    client = AsyncClient()
    assert (await client.get("/healthz", headers={"Host": "10.1.2.3:8000"})).status_code == 200
    assert (await client.get("/readyz", headers={"Host": "10.1.2.3:8000"})).status_code == 200
    assert (await client.get("/api/v1/messages/", headers={"Host": "10.1.2.3:8000"})).status_code == 400


async def test_payload_the_database_cannot_store_is_400(users):
    """PostgreSQL refuses \\u0000 in JSON text: a clear 400 whatever the database, not a 500."""
    response = await post(users["alice"], {"topic": "a", "payload": {"text": ["a\u0000b"]}})
    assert response.status_code == 400, response.content
    assert "U+0000" in response.json()["payload"][0]
    assert await count() == 0
    # The six characters \u0000 (an escaped backslash) are fine.
    fine = await post(users["alice"], {"topic": "a", "payload": {"text": "\\u0000"}})
    assert fine.status_code == 202, fine.content
