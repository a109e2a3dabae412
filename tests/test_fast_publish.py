"""The fast publish path (notifications/api/fast_publish.py) in-process, with a live bridge.

Token requests to the publish endpoints are answered by the ASGI route in front of Django; the
tests check that it answers exactly as the DRF views do, and that everything it must not answer
itself (no or bad credentials, no permission, throttling, bad input, sessions, a bad Host)
reaches Django and gets DRF's own answer.
"""

import asyncio
import json

import httpx
import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission, User
from django.core.asgi import get_asgi_application
from django.test import AsyncClient
from rest_framework.authtoken.models import Token
from rest_framework.throttling import UserRateThrottle

from notifications.api import fast_publish
from notifications.api.fast_publish import FastPublish
from notifications.models import IdempotencyKey, Message, Stream
from notifications.services.idempotency import request_hash
from tests.support.records import MESSAGE_RECORD_FIELDS

pytestmark = pytest.mark.usefixtures("bridge")

URL = "http://testserver/api/v1/messages/"


class NotDjango:
    """Stands in for Django behind the fast path: records that a request reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(autouse=True)
def _fresh_caches():
    fast_publish.forget_credentials()
    fast_publish._hosts.clear()
    yield
    fast_publish.forget_credentials()


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=20)


def fast_only() -> tuple[NotDjango, httpx.AsyncClient]:
    """A client of the fast path alone: any request it hands to Django answers 599."""
    django = NotDjango()
    return django, client(FastPublish(django))


def full() -> httpx.AsyncClient:
    """A client of the fast path in front of Django, as the ASGI module installs it."""
    return client(FastPublish(get_asgi_application()))


def headers(user, **extra: str) -> dict[str, str]:
    return ({"Authorization": f"Token {user.token}"} if user else {}) | extra


async def post(http: httpx.AsyncClient, user, body, path: str = URL, **extra: str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return await http.post(
        path, content=content, headers=headers(user, **extra) | {"Content-Type": "application/json"}
    )


async def count(model=Message, **filters) -> int:
    return await database_sync_to_async(model.objects.filter(**filters).count)()


async def test_a_token_publish_is_served_without_django_and_answers_like_the_view(users):
    django, http = fast_only()
    async with http:
        response = await post(http, users["alice"], {"topic": "orders", "event": "e", "payload": {"n": 1}})
    assert django.calls == 0
    assert response.status_code == 202, response.content
    record = response.json()
    assert set(record) == MESSAGE_RECORD_FIELDS
    assert record["status"] == "published" and record["deliveries"] == []
    assert (record["stream"], record["seq"], record["topic"], record["user"]) == (
        "topic:orders",
        1,
        "orders",
        None,
    )
    assert record["created_at"].endswith("Z") and record["published_at"].endswith("Z")
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    # The same record as the DRF view gives for the stored message (GET), deliveries aside.
    detail = (
        await AsyncClient().get(f"/api/v1/messages/{record['id']}/", headers=headers(users["alice"]))
    ).json()
    assert {k: v for k, v in detail.items() if k != "deliveries"} == {
        k: v for k, v in record.items() if k != "deliveries"
    }


async def test_user_and_broadcast_targets_and_stream_order(users):
    django, http = fast_only()
    async with http:
        first = (await post(http, users["alice"], {"user": "bob", "event": "notice", "payload": "hi"})).json()
        second = (await post(http, users["alice"], {"user": "bob"})).json()
        everyone = (await post(http, users["alice"], {"broadcast": True, "payload": [1, 2]})).json()
    assert django.calls == 0
    assert (first["user"], first["stream"], first["seq"]) == ("bob", "user", 1)
    assert second["seq"] == 2
    assert (everyone["broadcast"], everyone["stream"], everyone["seq"]) == (True, "broadcast", 1)


@pytest.mark.parametrize(
    ("who", "status"),
    [(None, 401), ("nope", 401), ("bob", 403)],
)
async def test_credentials_and_permission_are_drf_answers(users, who, status):
    user = users.get(who) if who in users else None
    extra = {"Authorization": "Token nope"} if who == "nope" else {}
    async with full() as http:
        response = await post(http, user, {"topic": "t"}, **extra)
    assert response.status_code == status, response.content
    assert "detail" in response.json()
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Token")
    assert await count() == 0


@pytest.mark.parametrize(
    ("body", "field", "status"),
    [
        ({"event": "x"}, "non_field_errors", 400),
        ({"topic": "a", "user": "bob"}, "non_field_errors", 400),
        ({"user": "nobody-by-that-name"}, "user", 400),
        ({"topic": "has space"}, "topic", 400),
        ({"topic": "a", "event": "bad event!"}, "event", 400),
        ({"topic": "a", "colour": "red"}, "colour", 400),
        (["not", "an", "object"], "non_field_errors", 400),
        ('{"topic": "a",', "detail", 400),
        ({"topic": "a", "payload": {"n": 2**70}}, "payload", 400),
        ({"topic": "a", "payload": "\u0000"}, "payload", 400),
    ],
)
async def test_bad_input_gets_drf_errors(users, body, field, status):
    async with full() as http:
        response = await post(http, users["alice"], body)
    assert response.status_code == status, response.content
    assert field in response.json()
    assert await count() == 0


async def test_values_drf_coerces_are_published_as_drf_reads_them(users):
    """A body the fast path does not take as it is (a number for a topic, "true" for broadcast,
    an event with spaces around it) goes to the view, which publishes what DRF makes of it."""
    async with full() as http:
        number = await post(http, users["alice"], {"topic": 123456789012345678901234567890})
        spaced = await post(http, users["alice"], {"broadcast": "true", "event": " e "})
    assert number.status_code == 202 and number.json()["topic"] == "123456789012345678901234567890"
    assert spaced.status_code == 202 and (spaced.json()["broadcast"], spaced.json()["event"]) == (True, "e")


async def test_oversized_payload_and_body_are_413(users, settings):
    settings.RT_MAX_PAYLOAD_BYTES = 1000
    async with full() as http:
        payload = await post(http, users["alice"], {"topic": "a", "payload": "x" * 1001})
        body = await post(http, users["alice"], {"topic": "a", "payload": "x" * 40_000})
    assert payload.status_code == body.status_code == 413
    assert "detail" in payload.json()
    assert await count() == 0


async def test_a_host_not_allowed_is_djangos_400(users):
    django, http = fast_only()
    async with http:
        response = await http.post(
            URL,
            content="{}",
            headers=headers(users["alice"], Host="evil.example", **{"Content-Type": "application/json"}),
        )
    assert django.calls == 1  # Django's host check answers (400)
    async with full() as http:
        response = await http.post(
            URL,
            content=json.dumps({"topic": "a"}),
            headers=headers(users["alice"], Host="evil.example", **{"Content-Type": "application/json"}),
        )
    assert response.status_code == 400
    assert await count() == 0


async def test_session_requests_go_through_the_view(users):
    from asgiref.sync import sync_to_async
    from django.test import Client

    sync_client = Client()
    await sync_to_async(sync_client.force_login)(
        await database_sync_to_async(User.objects.get)(username="alice")
    )
    cookie = f"sessionid={sync_client.cookies['sessionid'].value}"
    async with full() as http:
        response = await http.post(
            URL,
            content=json.dumps({"topic": "s"}),
            headers={"Content-Type": "application/json", "Cookie": cookie},
        )
    # DRF's SessionAuthentication enforces CSRF: without the token the view refuses (403), with
    # the token it publishes. Either way the answer is DRF's, not the fast path's.
    assert response.status_code == 403 and "CSRF" in response.json()["detail"]


async def test_idempotency_key_rules_on_the_fast_path(users):
    django, http = fast_only()
    body = {"topic": "orders", "event": "e", "payload": {"b": 1, "a": 2}}
    async with http:
        first = await post(http, users["alice"], body, **{"Idempotency-Key": "k-1"})
        reordered = '{"payload": {"a": 2, "b": 1}, "event": "e", "topic": "orders"}'
        again = await post(http, users["alice"], reordered, **{"Idempotency-Key": "k-1"})
        different = await post(http, users["alice"], {**body, "payload": 3}, **{"Idempotency-Key": "k-1"})
        too_long = await post(http, users["alice"], body, **{"Idempotency-Key": "k" * 256})
    assert django.calls == 0
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "published"
    assert different.status_code == 422 and "detail" in different.json()
    assert too_long.status_code == 400 and "Idempotency-Key" in too_long.json()
    assert await count() == 1


async def test_idempotency_key_in_flight_is_409(users):
    alice = await database_sync_to_async(User.objects.get)(username="alice")
    body = {"topic": "orders"}
    await database_sync_to_async(IdempotencyKey.objects.create)(
        user=alice, key="busy", request_hash=request_hash(body)
    )
    django, http = fast_only()
    async with http:
        response = await post(http, users["alice"], body, **{"Idempotency-Key": "busy"})
    assert response.status_code == 409 and "detail" in response.json()
    assert await count() == 0


async def test_throttling_is_drfs_429(users, monkeypatch):
    from django.core.cache import cache

    cache.clear()
    monkeypatch.setattr(UserRateThrottle, "THROTTLE_RATES", {"user": "2/min"})
    django, http = fast_only()
    async with http:
        answers = [await post(http, users["alice"], {"topic": "t"}) for _ in range(3)]
    # The DRF view counts on its own (in Django's cache; both per process).
    drf = [
        await AsyncClient().post(
            "/api/v1/messages/",
            data={"topic": "t"},
            content_type="application/json",
            headers=headers(users["alice"]),
        )
        for _ in range(3)
    ]
    cache.clear()
    assert django.calls == 0
    assert [a.status_code for a in answers] == [202, 202, 429]
    assert int(answers[2].headers["Retry-After"]) > 0
    assert answers[2].json()["detail"].startswith("Request was throttled.")
    assert [a.status_code for a in drf] == [202, 202, 429]


async def test_a_revoked_token_or_permission_takes_effect_at_once_in_this_process(users):
    async with full() as http:
        assert (await post(http, users["alice"], {"topic": "t"})).status_code == 202
        alice = await database_sync_to_async(User.objects.get)(username="alice")
        permission = await database_sync_to_async(Permission.objects.get)(codename="add_message")
        await database_sync_to_async(alice.user_permissions.remove)(permission)
        assert (await post(http, users["alice"], {"topic": "t"})).status_code == 403
        await database_sync_to_async(alice.user_permissions.add)(permission)
        assert (await post(http, users["alice"], {"topic": "t"})).status_code == 202
        await database_sync_to_async(Token.objects.filter(user=alice).delete)()
        assert (await post(http, users["alice"], {"topic": "t"})).status_code == 401


async def test_broker_down_is_503_with_the_seq_given_back(users, publisher):
    from notifications.broker import BrokerUnavailable

    class DeadBroker:
        async def publish_message(self, body, message_id, key):
            raise BrokerUnavailable("not connected to RabbitMQ")

        async def publish_broadcast(self, body, message_id):  # the interface before targeted routing
            raise BrokerUnavailable("not connected to RabbitMQ")

    django, http = fast_only()
    async with http:
        assert (await post(http, users["alice"], {"topic": "down"})).status_code == 202
        publisher(DeadBroker())
        failed = await post(http, users["alice"], {"topic": "down"}, **{"Idempotency-Key": "retry"})
    assert django.calls == 0
    assert failed.status_code == 503 and "detail" in failed.json()
    message = await database_sync_to_async(Message.objects.filter(status=Message.Status.FAILED).get)()
    assert message.seq is None and "broker" in message.error
    assert (await database_sync_to_async(Stream.objects.get)(name="topic:down")).last_seq == 1
    assert await count(IdempotencyKey) == 0  # a 503 is not remembered: retry with the same key


async def test_the_schema_still_lists_both_publish_endpoints(users):
    async with full() as http:
        schema = await http.get("/api/schema/", headers={"Accept": "application/json"})
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "post" in paths["/api/v1/messages/"] and "post" in paths["/api/v1/messages/batch/"]


async def test_concurrent_publishes_go_together_and_each_gets_its_own_answer(users):
    """Requests that arrive together are stored in one transaction and published together; a bad
    one among them fails alone, and keys keep their rules within a group."""
    alice = await database_sync_to_async(User.objects.get)(username="alice")
    await database_sync_to_async(IdempotencyKey.objects.create)(
        user=alice, key="busy", request_hash=request_hash({"topic": "many"})
    )
    django, http = fast_only()
    async with http:
        good = [post(http, users["alice"], {"topic": "many", "payload": i}) for i in range(40)]
        keyed = [
            post(http, users["alice"], {"topic": "many", "payload": "k"}, **{"Idempotency-Key": "same"})
            for _ in range(2)
        ]
        bad = [
            post(http, users["alice"], {"user": "nobody-by-that-name"}),
            post(http, users["alice"], {"topic": "many"}, **{"Idempotency-Key": "busy"}),
            post(http, users["alice"], {"topic": "many", "payload": 1}, **{"Idempotency-Key": "same"}),
        ]
        answers = await asyncio.gather(*good, *keyed, *bad)
    assert django.calls == 0
    good_answers, keyed_answers, bad_answers = answers[:40], answers[40:42], answers[42:]
    assert all(a.status_code == 202 for a in good_answers), [a.content for a in good_answers]
    assert [a.status_code for a in bad_answers[:2]] == [400, 409]
    # Three requests with one key (two with one body, one with another), in whatever order they
    # arrived: one of them publishes; the others are in flight (409), a replay of it (202, same
    # message), or, with the other body, a 422.
    same_key = [(a, "k") for a in keyed_answers] + [(bad_answers[2], 1)]
    accepted = {a.json()["id"]: a.json()["payload"] for a, _ in same_key if a.status_code == 202}
    assert len(accepted) == 1, [a.content for a, _ in same_key]
    winner = next(iter(accepted.values()))
    for answer, payload in same_key:
        allowed = (202, 409) if payload == winner else (409, 422)
        assert answer.status_code in allowed, (payload, winner, answer.content)
    keyed_answers = [a for a, _ in same_key]
    published = [a.json() for a in good_answers] + [a.json() for a in keyed_answers if a.status_code == 202]
    assert len({r["id"] for r in published}) == 41
    assert sorted({r["seq"] for r in published}) == list(range(1, 42)), "one gap-free numbering"
    assert all(r["status"] == "published" for r in published)
    assert await count() == 41
    assert (await database_sync_to_async(Stream.objects.get)(name="topic:many")).last_seq == 41
