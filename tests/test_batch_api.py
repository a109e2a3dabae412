"""`POST /api/v1/messages/batch/` (CONTRACT §3): all or nothing, request order, one Idempotency-Key.

In-process through both ways in (the DRF view, and the fast ASGI path that serves token
requests), then across real processes: 1000 messages to 100 users' sockets in one request, and a
broker outage that leaves no hole in any stream.
"""

import asyncio
import json
from collections import Counter

import httpx
import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.core.asgi import get_asgi_application
from django.test import AsyncClient

from notifications import publishing
from notifications.api import fast_publish, views
from notifications.api.fast_publish import FastPublish
from notifications.broker import BrokerUnavailable
from notifications.models import IdempotencyKey, Message, Stream
from notifications.services import messages as messages_service
from notifications.services import unconfirmed
from notifications.services.idempotency import request_hash
from tests.conftest import make_user
from tests.support.clients import open_socket, post_message
from tests.support.metrics import is_ready
from tests.support.skips import needs_rabbitmq_server
from tests.support.waiting import eventually

BATCH = "/api/v1/messages/batch/"


@pytest.fixture(autouse=True)
def _fresh_credentials():
    fast_publish.forget_credentials()
    yield
    fast_publish.forget_credentials()


class Poster:
    """POSTs through the DRF view (Django's AsyncClient) or the fast path in front of Django."""

    def __init__(self, way: str) -> None:
        self.way = way

    async def __call__(self, user, body, path: str = BATCH, **headers: str) -> httpx.Response | object:
        content = body if isinstance(body, str) else json.dumps(body)
        auth = {"Authorization": f"Token {user.token}"} if user else {}
        if self.way == "view":
            return await AsyncClient().post(
                path, data=content, content_type="application/json", headers=auth | headers
            )
        transport = httpx.ASGITransport(app=FastPublish(get_asgi_application()))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as http:
            return await http.post(
                path, content=content, headers=auth | headers | {"Content-Type": "application/json"}
            )


@pytest.fixture(params=["view", "fast"])
def post(request, bridge) -> Poster:
    return Poster(request.param)


def json_of(response) -> dict:
    return response.json()


async def count(model=Message, **filters) -> int:
    return await database_sync_to_async(model.objects.filter(**filters).count)()


async def last_seq(stream: str) -> int:
    found = await database_sync_to_async(Stream.objects.filter(name=stream).first)()
    return found.last_seq if found else 0


MIXED = [
    {"topic": "orders", "event": "a", "payload": {"i": 0}},
    {"user": "bob", "event": "b", "payload": {"i": 1}},
    {"topic": "orders", "payload": {"i": 2}},
    {"broadcast": True, "event": "c", "payload": None},
    {"user": "bob", "payload": {"i": 4}},
    {"user": "carol", "payload": "x"},
]


async def test_batch_answers_every_record_in_request_order(users, post):
    response = await post(users["alice"], {"messages": MIXED})
    assert response.status_code == 202, response.content
    records = json_of(response)["messages"]
    assert [r["payload"] for r in records] == [item.get("payload") for item in MIXED]
    assert all(r["status"] == "published" and r["deliveries"] == [] for r in records)
    assert [(r["stream"], r["seq"]) for r in records] == [
        ("topic:orders", 1),
        ("user", 1),
        ("topic:orders", 2),
        ("broadcast", 1),
        ("user", 2),
        ("user", 1),
    ]
    assert [r["user"] for r in records] == [None, "bob", None, None, "bob", "carol"]
    assert await count(status=Message.Status.PUBLISHED) == len(MIXED)
    # Records as the detail view gives them.
    detail = await AsyncClient().get(
        f"/api/v1/messages/{records[1]['id']}/", headers={"Authorization": f"Token {users['alice'].token}"}
    )
    assert {k: v for k, v in detail.json().items() if k != "deliveries"} == {
        k: v for k, v in records[1].items() if k != "deliveries"
    }


async def test_one_invalid_item_makes_the_whole_batch_a_400_with_each_items_errors(users, post):
    items = [
        {"topic": "ok"},
        {"topic": "has space"},
        {"user": "bob"},
        {"user": "nobody-by-that-name"},
        {"topic": "a", "user": "bob"},
        {"topic": "a", "colour": "red"},
        "not an object",
    ]
    response = await post(users["alice"], {"messages": items})
    assert response.status_code == 400, response.content
    errors = json_of(response)["messages"]
    assert len(errors) == len(items)
    assert errors[0] == {} and errors[2] == {}
    assert "topic" in errors[1]
    assert "No user named" in errors[3]["user"][0]
    assert "non_field_errors" in errors[4] and "colour" in errors[5] and "non_field_errors" in errors[6]
    assert await count() == 0
    assert await last_seq("topic:ok") == 0


@pytest.mark.parametrize(
    "body",
    [
        ["not", "an", "object"],
        {"messages": []},
        {"messages": {"topic": "a"}},
        {"messages": [{"topic": "a"}] * 1001},
        {"messages": [{"topic": "a"}], "extra": 1},
        {},
    ],
)
async def test_a_batch_of_the_wrong_shape_is_a_400(users, post, body):
    response = await post(users["alice"], body)
    assert response.status_code == 400, response.content
    assert await count() == 0


async def test_a_batch_with_a_too_large_payload_names_the_item(users, post, settings):
    settings.RT_MAX_PAYLOAD_BYTES = 100
    response = await post(
        users["alice"], {"messages": [{"topic": "a"}, {"topic": "a", "payload": "x" * 101}]}
    )
    assert response.status_code == 400
    errors = json_of(response)["messages"]
    assert errors[0] == {} and "payload" in errors[1]


async def test_a_request_over_the_size_bound_is_413(users, post, monkeypatch):
    monkeypatch.setattr(views, "BATCH_MAX_BYTES", 1000)
    response = await post(users["alice"], {"messages": [{"topic": "a", "payload": "x" * 1000}]})
    assert response.status_code == 413 and "detail" in json_of(response)
    assert await count() == 0


async def test_a_batch_needs_credentials_and_the_publish_permission(users, post):
    assert (await post(None, {"messages": [{"topic": "a"}]})).status_code == 401
    assert (await post(users["bob"], {"messages": [{"topic": "a"}]})).status_code == 403
    assert await count() == 0


async def test_an_idempotency_key_covers_the_whole_batch(users, post):
    body = {"messages": MIXED}
    first = await post(users["alice"], body, **{"Idempotency-Key": "batch-1"})
    assert first.status_code == 202
    again = await post(users["alice"], body, **{"Idempotency-Key": "batch-1"})
    assert again.status_code == 202
    assert [r["id"] for r in json_of(again)["messages"]] == [r["id"] for r in json_of(first)["messages"]]
    assert [r["seq"] for r in json_of(again)["messages"]] == [r["seq"] for r in json_of(first)["messages"]]
    assert await count() == len(MIXED)
    different = await post(users["alice"], {"messages": MIXED[:2]}, **{"Idempotency-Key": "batch-1"})
    assert different.status_code == 422
    # The single endpoint's body differs from a batch's: the same key there is a 422 too.
    single = await post(users["alice"], MIXED[0], path="/api/v1/messages/", **{"Idempotency-Key": "batch-1"})
    assert single.status_code == 422
    assert await count() == len(MIXED)


async def test_an_idempotency_key_in_flight_is_409(users, post):
    body = {"messages": [{"topic": "a"}]}
    alice = await database_sync_to_async(User.objects.get)(username="alice")
    await database_sync_to_async(IdempotencyKey.objects.create)(
        user=alice, key="busy", request_hash=request_hash(body)
    )
    response = await post(users["alice"], body, **{"Idempotency-Key": "busy"})
    assert response.status_code == 409
    assert await count() == 0


async def test_concurrent_batches_are_stored_together_and_each_gets_its_own_answer(
    users, bridge, monkeypatch
):
    """Batches that arrive while others are being stored go in one transaction (the fast path);
    each keeps its own answer, its own request order within every stream, and its own errors."""
    groups: list[int] = []
    accept_together = fast_publish.accept_together

    def counting(flows):
        groups.append(len(flows))
        return accept_together(flows)

    monkeypatch.setattr(fast_publish, "accept_together", counting)
    transport = httpx.ASGITransport(app=FastPublish(get_asgi_application()))

    def batch(n: int) -> dict:
        return {"messages": [{"topic": "together", "payload": [n, i]} for i in range(5)] + [{"user": "bob"}]}

    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as http:

        async def post(body, **headers: str) -> httpx.Response:
            auth = {"Authorization": f"Token {users['alice'].token}", "Content-Type": "application/json"}
            return await http.post(BATCH, content=json.dumps(body), headers=auth | headers)

        keyed = batch(100)
        answers = await asyncio.gather(
            *(post(batch(n)) for n in range(12)),
            post(keyed, **{"Idempotency-Key": "twice"}),
            post(keyed, **{"Idempotency-Key": "twice"}),
            post({"messages": [{"topic": "together"}, {"user": "nobody-by-that-name"}]}),
        )
    assert max(groups) > 1, groups
    *good, first_keyed, second_keyed, bad = answers
    assert all(a.status_code == 202 for a in good), [a.content for a in good]
    assert bad.status_code == 400 and json_of(bad)["messages"][0] == {}, bad.content
    # The two requests with one key: one publishes, the other is in flight (409) or its replay.
    assert sorted([first_keyed.status_code, second_keyed.status_code]) in ([202, 202], [202, 409])
    keyed_ids = {
        tuple(r["id"] for r in json_of(a)["messages"])
        for a in (first_keyed, second_keyed)
        if a.status_code == 202
    }
    assert len(keyed_ids) == 1
    published = [json_of(a)["messages"] for a in good] + [
        json_of(next(a for a in (first_keyed, second_keyed) if a.status_code == 202))["messages"]
    ]
    topic_seqs = []
    for records in published:
        assert all(r["status"] == "published" for r in records)
        seqs = [r["seq"] for r in records if r["topic"] == "together"]
        assert seqs == list(range(seqs[0], seqs[0] + 5)), "a batch keeps its order, unbroken"
        assert [r["payload"][1] for r in records if r["topic"] == "together"] == list(range(5))
        topic_seqs += seqs
    assert sorted(topic_seqs) == list(range(1, 66)), "one gap-free numbering"
    bob = await database_sync_to_async(User.objects.get)(username="bob")
    assert await last_seq(f"user:{bob.pk}") == 13
    assert await count() == 13 * 6


class FailingBroker:
    """A publisher whose confirms fail: every publish, or only from the `after`-th one on."""

    def __init__(self, after: int = 0, maybe_taken: bool = False, real=None) -> None:
        self.after = after
        self.maybe_taken = maybe_taken
        self.real = real
        self.calls = 0

    async def _publish(self, forward):
        self.calls += 1
        if self.calls > self.after:
            raise BrokerUnavailable("not connected to RabbitMQ", maybe_taken=self.maybe_taken)
        await forward()

    async def publish_message(self, body, message_id, key):
        await self._publish(lambda: self.real.publish_message(body, message_id, key))

    async def publish_broadcast(self, body, message_id):  # the interface before targeted routing
        await self._publish(lambda: self.real.publish_broadcast(body, message_id))


async def test_broker_down_is_503_every_record_failed_and_every_seq_given_back(users, post, publisher):
    ok = await post(users["alice"], {"messages": [{"topic": "t"}, {"user": "bob"}]})
    assert ok.status_code == 202
    publisher(FailingBroker())
    items = [{"topic": "t", "payload": i} for i in range(150)] + [{"user": "bob"}, {"broadcast": True}]
    failed = await post(users["alice"], {"messages": items}, **{"Idempotency-Key": "down"})
    assert failed.status_code == 503 and "detail" in json_of(failed)
    assert await count(status=Message.Status.FAILED) == len(items)
    assert await count(status=Message.Status.FAILED, seq__isnull=False) == 0
    bob = await database_sync_to_async(User.objects.get)(username="bob")
    assert (await last_seq("topic:t"), await last_seq(f"user:{bob.pk}"), await last_seq("broadcast")) == (
        1,
        1,
        0,
    )
    assert await count(IdempotencyKey) == 0  # not remembered: retry with the same key


async def test_no_publisher_in_the_process_is_503_with_every_seq_given_back(users, post):
    ok = await post(users["alice"], {"messages": [{"topic": "t"}]})
    assert ok.status_code == 202
    publishing.install(None)  # the `publisher` fixture puts back what was there
    failed = await post(users["alice"], {"messages": [{"topic": "t"}, {"user": "bob"}]})
    assert failed.status_code == 503 and "detail" in json_of(failed)
    assert await count(status=Message.Status.FAILED, seq__isnull=True) == 2
    assert await last_seq("topic:t") == 1


async def test_a_broker_lost_mid_batch_leaves_the_rest_accepted_for_the_sweeper(
    users, post, publisher, bridge, monkeypatch, settings
):
    # 150 messages of one topic travel as two broker messages: the second is not confirmed.
    monkeypatch.setattr(messages_service, "BROKER_BATCH_ITEMS", 100)
    publisher(FailingBroker(after=1, real=bridge))
    items = [{"topic": "half", "payload": i} for i in range(150)]
    response = await post(users["alice"], {"messages": items}, **{"Idempotency-Key": "half"})
    assert response.status_code == 202, response.content
    statuses = Counter(r["status"] for r in json_of(response)["messages"])
    assert statuses == {"published": 100, "accepted": 50}
    assert [r["seq"] for r in json_of(response)["messages"]] == list(range(1, 151))
    assert await count(status=Message.Status.ACCEPTED, published_at__isnull=True) == 50
    assert await count(IdempotencyKey, completed_at__isnull=False) == 1
    settings.RT_SWEEP_GRACE_SECONDS = 0  # the sweeper finds them (their store's row stayed)
    swept = await database_sync_to_async(unconfirmed.unconfirmed_messages)()
    assert [m.seq for m in swept] == list(range(101, 151))


# --- across real processes ------------------------------------------------------------------

LISTENERS = 100
PER_USER = 10


def make_listeners(count: int) -> list:
    return [make_user(f"listener-{i:03d}") for i in range(count)]


async def test_1000_messages_to_100_users_in_one_request_arrive_once_and_in_order(cluster, users):
    listeners = await database_sync_to_async(make_listeners)(LISTENERS)
    webs = [cluster.add_web(), cluster.add_web()]
    for web in webs:
        web.wait_ready()
    async with httpx.AsyncClient(timeout=60) as http:
        sockets = await asyncio.gather(
            *(open_socket(http, webs[i % 2], user) for i, user in enumerate(listeners))
        )
        items = [
            {"user": listeners[i % LISTENERS].username, "event": "batch", "payload": {"i": i}}
            for i in range(LISTENERS * PER_USER)
        ]
        response = await http.post(
            f"{webs[0].url}{BATCH}", json={"messages": items}, headers=users["alice"].headers
        )
        assert response.status_code == 202, response.text[:500]
        records = response.json()["messages"]
        assert [r["payload"]["i"] for r in records] == list(range(len(items)))
        assert all(r["status"] == "published" for r in records)

        for socket in sockets:
            await socket.wait_for(lambda s: len(s.messages) >= PER_USER, timeout=60, what="the batch")
        marker = await post_message(http, webs[1], users["alice"], {"broadcast": True, "event": "end"})
        assert marker.status_code == 202
        for index, socket in enumerate(sockets):
            await socket.wait_for(lambda s: s.messages[-1]["event"] == "end", timeout=30, what="the marker")
            got = [m for m in socket.messages if m["event"] == "batch"]
            expected = [i for i in range(len(items)) if i % LISTENERS == index]
            assert [m["payload"]["i"] for m in got] == expected, "each message once, in request order"
            assert [m["seq"] for m in got] == list(range(1, PER_USER + 1)), "contiguous seqs"
            assert {m["stream"] for m in got} == {"user"}
        await asyncio.gather(*(socket.close() for socket in sockets))


@needs_rabbitmq_server
async def test_a_batch_refused_while_the_broker_is_down_leaves_no_hole(cluster, users, private_rabbit):
    cluster.extra_env["AMQP_URL"] = private_rabbit.url
    web = cluster.add_web()
    web.wait_ready()
    async with httpx.AsyncClient(timeout=60) as http:
        bob = await open_socket(http, web, users["bob"])
        await bob.request({"type": "subscribe", "topic": "news"}, "subscribed")
        first = await http.post(
            f"{web.url}{BATCH}",
            json={"messages": [{"user": "bob", "payload": 1}, {"topic": "news", "payload": 1}]},
            headers=users["alice"].headers,
        )
        assert first.status_code == 202, first.text
        await bob.wait_for(lambda s: len(s.messages) >= 2, what="the first batch")

        await asyncio.to_thread(private_rabbit.stop_app)

        async def down() -> bool:
            return not await is_ready(http, web)

        await eventually(down, 30, "the instance to notice the outage")
        refused = await http.post(
            f"{web.url}{BATCH}",
            json={"messages": [{"user": "bob", "payload": 2}, {"topic": "news", "payload": 2}] * 5},
            headers=users["alice"].headers | {"Idempotency-Key": "outage"},
        )
        assert refused.status_code == 503, refused.text

        await asyncio.to_thread(private_rabbit.start_app)
        await eventually(lambda: is_ready(http, web), 60, "the instance to reconnect")
        after_user = await post_message(http, web, users["alice"], {"user": "bob", "payload": 3})
        after_topic = await post_message(http, web, users["alice"], {"topic": "news", "payload": 3})
        assert after_user.status_code == after_topic.status_code == 202
        assert after_user.json()["seq"] == 2 and after_topic.json()["seq"] == 2, "the seqs follow on"
        await bob.wait_for(lambda s: len(s.messages) >= 4, timeout=30, what="the messages after the outage")
        assert [(m["stream"], m["seq"], m["payload"]) for m in bob.messages] == [
            ("user", 1, 1),
            ("topic:news", 1, 1),
            ("user", 2, 3),
            ("topic:news", 2, 3),
        ]
        failed = await count(status=Message.Status.FAILED)
        assert failed == 10
        await bob.close()
