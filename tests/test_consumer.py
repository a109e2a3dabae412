"""The consumer in-process with WebsocketCommunicator, against a real RabbitMQ and database."""

import json
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group, User

from notifications.models import Delivery, InboundFrame, Message, Topic
from notifications.tickets import issue_ticket
from realtime_project.asgi import application


async def connect(username: str, **headers) -> tuple[WebsocketCommunicator, dict]:
    user = await database_sync_to_async(User.objects.get)(username=username)
    ticket = await database_sync_to_async(issue_ticket)(user)
    communicator = WebsocketCommunicator(
        application, f"/ws/?ticket={ticket}", headers=[(k.encode(), v.encode()) for k, v in headers.items()]
    )
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    welcome = await communicator.receive_json_from(timeout=5)
    return communicator, welcome


async def request(communicator: WebsocketCommunicator, frame) -> dict:
    await communicator.send_to(text_data=frame if isinstance(frame, str) else json.dumps(frame))
    return await communicator.receive_json_from(timeout=5)


async def publish(**fields) -> Message:
    """Publish as the API does: record first, then a confirmed publish through the bridge, then
    the record of the confirm."""
    from notifications.services.messages import create_message, mark_published, publish_many

    message = await database_sync_to_async(create_message)(**fields)
    assert await publish_many([message]) == [], "the broker did not confirm"
    await database_sync_to_async(mark_published)([message])
    return message


async def test_welcome_names_connection_instance_and_user(bridge, users):
    communicator, welcome = await connect("bob")
    assert welcome["type"] == "welcome"
    assert welcome["user"] == "bob"
    assert welcome["instance"] == bridge.instance_id
    assert welcome["connection"].startswith("c-")
    await communicator.disconnect()


async def test_topic_user_and_broadcast_messages_reach_matching_sockets(bridge, users):
    bob, _ = await connect("bob")
    carol, _ = await connect("carol")
    subscribed = await request(bob, {"type": "subscribe", "topic": "orders"})
    assert subscribed == {"type": "subscribed", "topic": "orders", "seq": 0, "epoch": subscribed["epoch"]}

    sent = await publish(topic="orders", event="order.shipped", payload={"order": 42})
    frame = await bob.receive_json_from(timeout=5)
    assert frame == {
        "type": "message",
        "id": str(sent.id),
        "stream": "topic:orders",
        "seq": 1,
        "epoch": subscribed["epoch"],
        "topic": "orders",
        "event": "order.shipped",
        "payload": {"order": 42},
        "published_at": frame["published_at"],
    }
    assert frame["published_at"].endswith("Z")

    bob_user = await database_sync_to_async(User.objects.get)(username="bob")
    to_bob = await publish(user=bob_user, event="notice", payload={"text": "hi"})
    assert (await bob.receive_json_from(timeout=5))["id"] == str(to_bob.id)

    everyone = await publish(broadcast=True, event="maintenance", payload={"in_minutes": 5})
    assert (await bob.receive_json_from(timeout=5))["id"] == str(everyone.id)
    assert (await carol.receive_json_from(timeout=5))["id"] == str(everyone.id)
    # carol is not subscribed to orders and is not bob: the broadcast was all she got.
    assert await carol.receive_nothing(timeout=0.3)
    assert await bob.receive_nothing(timeout=0.3)
    await bob.disconnect()
    await carol.disconnect()


async def test_unsubscribe_stops_topic_messages(bridge, users):
    bob, _ = await connect("bob")
    await request(bob, {"type": "subscribe", "topic": "news"})
    assert await request(bob, {"type": "unsubscribe", "topic": "news"}) == {
        "type": "unsubscribed",
        "topic": "news",
    }
    await publish(topic="news", event="x")
    marker = await publish(broadcast=True, event="marker")
    assert (await bob.receive_json_from(timeout=5))["id"] == str(marker.id)
    await bob.disconnect()


async def test_ack_is_recorded_in_the_delivery_log(bridge, users):
    bob, welcome = await connect("bob")
    message = await publish(broadcast=True, event="hello")
    frame = await bob.receive_json_from(timeout=5)
    await bob.send_json_to({"type": "ack", "id": frame["id"]})
    assert await request(bob, {"type": "ping"}) == {"type": "pong"}  # the ack was taken before the ping
    await bridge.log.flush()
    delivery = await database_sync_to_async(Delivery.objects.get)(message_id=message.id)
    assert delivery.connection == welcome["connection"]
    assert delivery.instance == bridge.instance_id
    assert delivery.acked_at is not None and delivery.acked_at >= delivery.delivered_at
    await bob.disconnect()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ('{"type": "teleport", "ref": "r9"}', "unknown_type"),
        ('["a", "list"]', "invalid"),
        ('{"no": "type"}', "invalid"),
        ('{"type": "subscribe", "topic": "has spaces"}', "invalid"),
        ('{"type": "subscribe"}', "invalid"),
        ('{"type": "ack", "id": "not-a-uuid"}', "invalid"),
        ('{"type": "send", "ref": "r1", "event": "no.such.handler", "payload": {}}', "unknown_type"),
        ('{"type": "send", "ref": "r2", "payload": {}}', "invalid"),
        ('{"type": "send", "ref": "r3", "event": "diag.sleep", "payload": {"ms": 99999}}', "invalid"),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_keeps_working(bridge, users, settings, frame, code):
    settings.RT_INBOUND_HANDLERS = settings.RT_INBOUND_HANDLERS | {
        "diag.sleep": "consumers_app.handlers.diagnostics.SleepHandler"
    }
    bob, _ = await connect("bob")
    error = await request(bob, frame)
    assert error["type"] == "error" and error["code"] == code, error
    assert error["detail"]
    parsed = json.loads(frame) if code != "bad_json" else None
    expected_ref = parsed.get("ref") if isinstance(parsed, dict) else None
    assert error["ref"] == expected_ref
    assert await request(bob, {"type": "ping"}) == {"type": "pong"}
    assert await database_sync_to_async(InboundFrame.objects.count)() == 0, "a bad frame queued nothing"
    await bob.disconnect()


async def test_oversized_frame_and_payload_get_too_large(bridge, users, settings):
    settings.RT_MAX_FRAME_BYTES = 1000
    settings.RT_MAX_PAYLOAD_BYTES = 500
    bob, _ = await connect("bob")
    big_frame = json.dumps({"type": "ping", "ref": "big", "pad": "x" * 2000})
    assert (await request(bob, big_frame))["code"] == "too_large"
    big_payload = {"type": "send", "ref": "p", "event": "echo", "payload": "y" * 600}
    error = await request(bob, big_payload)
    assert (error["code"], error["ref"]) == ("too_large", "p")
    assert await request(bob, {"type": "ping"}) == {"type": "pong"}
    await bob.disconnect()


async def test_frames_beyond_the_rate_are_refused(bridge, users, settings):
    settings.RT_SOCKET_RATE = 5  # burst of 10
    bob, _ = await connect("bob")
    answers = [await request(bob, {"type": "ping"}) for _ in range(14)]
    limited = [a for a in answers if a.get("code") == "rate_limited"]
    assert answers[0] == {"type": "pong"}
    assert 1 <= len(limited) <= 4
    await bob.disconnect()


async def test_restricted_topic_is_forbidden_to_outsiders(bridge, users):
    def restrict():
        topic = Topic.objects.create(name="ops")
        topic.groups.add(Group.objects.create(name="operators"))
        User.objects.get(username="carol").groups.add(Group.objects.get(name="operators"))

    await database_sync_to_async(restrict)()
    bob, _ = await connect("bob")
    carol, _ = await connect("carol")
    staff, _ = await connect("staff")
    refused = await request(bob, {"type": "subscribe", "topic": "ops", "ref": "s1"})
    assert (refused["code"], refused["ref"]) == ("forbidden", "s1")
    assert (await request(carol, {"type": "subscribe", "topic": "ops"}))["type"] == "subscribed"
    assert (await request(staff, {"type": "subscribe", "topic": "ops"}))["type"] == "subscribed"
    # Open topics stay open.
    assert (await request(bob, {"type": "subscribe", "topic": "lobby"}))["type"] == "subscribed"
    for communicator in (bob, carol, staff):
        await communicator.disconnect()


async def test_handshake_refused_without_valid_credentials(bridge, users, settings):
    for path in ("/ws/", "/ws/?ticket=forged", f"/ws/?ticket={uuid.uuid4()}"):
        communicator = WebsocketCommunicator(application, path)
        connected, code = await communicator.connect(timeout=5)
        assert not connected, path
        await communicator.disconnect()


async def test_handshake_refused_from_a_foreign_origin(bridge, users):
    user = await database_sync_to_async(User.objects.get)(username="bob")
    ticket = await database_sync_to_async(issue_ticket)(user)
    foreign = WebsocketCommunicator(
        application, f"/ws/?ticket={ticket}", headers=[(b"origin", b"https://evil.example")]
    )
    connected, _ = await foreign.connect(timeout=5)
    assert not connected
    # The same host on another port or scheme is another origin.
    for origin, host in [
        (b"http://localhost:9999", b"localhost:8000"),
        (b"https://localhost:8000", b"localhost:8000"),
        (b"http://localhost:8000", b"evil.example:8000"),
    ]:
        other = WebsocketCommunicator(
            application, f"/ws/?ticket={ticket}", headers=[(b"origin", origin), (b"host", host)]
        )
        connected, _ = await other.connect(timeout=5)
        assert not connected, (origin, host)
    local = WebsocketCommunicator(
        application,
        f"/ws/?ticket={ticket}",
        headers=[(b"origin", b"http://localhost:8000"), (b"host", b"localhost:8000")],
    )
    connected, _ = await local.connect(timeout=5)
    assert connected
    await local.disconnect()


async def test_a_trusted_origin_of_another_port_may_open_a_socket(bridge, users, settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example.com"]
    user = await database_sync_to_async(User.objects.get)(username="bob")
    ticket = await database_sync_to_async(issue_ticket)(user)
    trusted = WebsocketCommunicator(
        application,
        f"/ws/?ticket={ticket}",
        headers=[(b"origin", b"https://app.example.com"), (b"host", b"localhost:8000")],
    )
    connected, _ = await trusted.connect(timeout=5)
    assert connected
    await trusted.disconnect()


async def test_a_socket_that_comes_while_its_instance_starts_waits_for_the_broker(
    transactional_db, namespace, settings, users
):
    """A browser reconnects as soon as a restarted instance's port answers, before /readyz does:
    its first frames must not be refused as "unavailable" because the bridge is still connecting."""
    from consumers_app.bridge import get_bridge, reset_bridge
    from tests.support.broker import delete_namespace

    await reset_bridge()  # a new process: no bridge yet; the socket starts it
    try:
        communicator, welcome = await connect("bob")
        answer = await request(communicator, {"type": "subscribe", "topic": "orders", "ref": "s1"})
        assert answer["type"] == "subscribed", answer
        assert get_bridge().ready
        await communicator.disconnect()
    finally:
        await reset_bridge()
        await delete_namespace(namespace, [settings.RT_INSTANCE_ID])
