"""Across processes: two real Daphne instances, one RabbitMQ, one database (CONTRACT §5.1, §5.3)."""

import asyncio
import json
import time
from unittest import mock

import httpx
import pytest
import websockets
from django.contrib.auth.models import User

from notifications.tickets import issue_ticket
from tests.support.clients import LiveSocket, open_socket, post_message, publish, ticket
from tests.support.processes import free_port
from tests.support.waiting import eventually


@pytest.fixture
def two_webs(cluster):
    web_a, web_b = cluster.add_web(), cluster.add_web()
    web_a.wait_ready()
    web_b.wait_ready()
    return web_a, web_b


async def test_messages_published_through_a_reach_sockets_on_b_exactly_once(two_webs, users):
    web_a, web_b = two_webs
    async with httpx.AsyncClient(timeout=20) as http:
        bob = await open_socket(http, web_b, users["bob"])
        assert bob.welcome["instance"] == "web-2"
        await bob.request({"type": "subscribe", "topic": "orders"}, "subscribed")
        alice = users["alice"]
        sent = [
            await publish(
                http, web_a, alice, {"topic": "orders", "event": "order.shipped", "payload": {"order": 42}}
            ),
            await publish(http, web_a, alice, {"user": "bob", "event": "notice", "payload": {"text": "hi"}}),
            await publish(
                http, web_a, alice, {"broadcast": True, "event": "maintenance", "payload": {"in": 5}}
            ),
        ]
        await bob.wait_for(lambda s: len(s.messages) >= 3, what="three messages")
        # A last broadcast marks the end: anything duplicated would have arrived before it.
        marker = await publish(http, web_a, alice, {"broadcast": True, "event": "end"})
        await bob.wait_for(lambda s: any(m["id"] == marker["id"] for m in s.messages), what="marker")
        assert [m["id"] for m in bob.messages] == [m["id"] for m in sent] + [marker["id"]]
        assert [m["event"] for m in bob.messages[:3]] == ["order.shipped", "notice", "maintenance"]
        await bob.close()


async def test_a_users_sockets_on_both_instances_get_its_messages_and_nobody_else_does(two_webs, users):
    web_a, web_b = two_webs
    async with httpx.AsyncClient(timeout=20) as http:
        bob_sockets = [await open_socket(http, web, users["bob"]) for web in (web_a, web_b, web_b)]
        carol_sockets = [await open_socket(http, web, users["carol"]) for web in (web_a, web_b)]
        for_bob = await publish(http, web_b, users["alice"], {"user": "bob", "event": "private"})
        for socket in bob_sockets:
            await socket.wait_for(lambda s: len(s.messages) >= 1, what="bob's message")
        marker = await publish(http, web_a, users["alice"], {"broadcast": True, "event": "end"})
        for socket in bob_sockets + carol_sockets:
            await socket.wait_for(lambda s: any(m["id"] == marker["id"] for m in s.messages), what="marker")
        for socket in bob_sockets:
            assert [m["id"] for m in socket.messages] == [for_bob["id"], marker["id"]]
        for socket in carol_sockets:
            assert [m["id"] for m in socket.messages] == [marker["id"]]
        for socket in bob_sockets + carol_sockets:
            await socket.close()


async def test_fifty_sockets_times_a_hundred_messages_lose_nothing_duplicate_nothing_keep_order(
    two_webs, users
):
    web_a, web_b = two_webs
    listeners = [users["bob"], users["carol"]]
    async with httpx.AsyncClient(timeout=30) as http:
        tickets = [await ticket(http, (web_a, web_b)[i % 2].url, listeners[i % 2]) for i in range(50)]
        sockets = await asyncio.gather(
            *(LiveSocket.open(f"{(web_a, web_b)[i % 2].ws_url}?ticket={t}") for i, t in enumerate(tickets))
        )
        assert {s.welcome["instance"] for s in sockets} == {"web-1", "web-2"}
        await asyncio.gather(
            *(s.request({"type": "subscribe", "topic": "load"}, "subscribed") for s in sockets)
        )
        sent_ids = []
        for n in range(100):
            record = await publish(
                http, web_a, users["alice"], {"topic": "load", "event": "n", "payload": {"n": n}}
            )
            sent_ids.append(record["id"])
        for socket in sockets:
            await socket.wait_for(lambda s: len(s.messages) >= 100, timeout=60, what="100 messages")
        marker = await publish(http, web_b, users["alice"], {"topic": "load", "event": "end"})
        for socket in sockets:
            await socket.wait_for(
                lambda s: s.messages and s.messages[-1]["id"] == marker["id"], what="marker"
            )
            received = [m["id"] for m in socket.messages]
            assert received == sent_ids + [marker["id"]], "lost, duplicated or reordered"
        await asyncio.gather(*(s.close() for s in sockets))

        # The delivery log has one row per socket per message, from both instances.
        async def logged() -> list[dict]:
            detail = await http.get(
                f"{web_a.url}/api/v1/messages/{sent_ids[-1]}/", headers=users["alice"].headers
            )
            found = detail.json()["deliveries"]
            return found if len(found) >= 50 else []

        deliveries = await eventually(logged, 15, "50 delivery rows", interval=0.2)
        assert len(deliveries) == 50
        assert {d["instance"] for d in deliveries} == {"web-1", "web-2"}


async def expect_refused(url: str, status: int = 403, **kwargs) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, open_timeout=10, **kwargs):
            pass
    assert refused.value.response.status_code == status


async def test_handshakes_without_valid_credentials_are_refused_with_403(two_webs, users):
    web_a, _ = two_webs
    bob = await asyncio.to_thread(User.objects.get, username="bob")
    with mock.patch("time.time", return_value=time.time() - 3600):
        expired = await asyncio.to_thread(issue_ticket, bob)
    await expect_refused(web_a.ws_url)
    await expect_refused(f"{web_a.ws_url}?ticket=forged-ticket")
    await expect_refused(f"{web_a.ws_url}?ticket={expired}")
    async with httpx.AsyncClient(timeout=20) as http:
        good = await ticket(http, web_a.url, users["bob"])
    await expect_refused(f"{web_a.ws_url}?ticket={good}", origin="https://evil.example")
    socket = await LiveSocket.open(f"{web_a.ws_url}?ticket={good}", origin=f"http://127.0.0.1:{web_a.port}")
    await socket.close()


async def test_bad_frames_over_real_daphne_keep_the_socket_and_others_working(two_webs, users):
    web_a, _ = two_webs
    async with httpx.AsyncClient(timeout=20) as http:
        bob = await open_socket(http, web_a, users["bob"])
        carol = await open_socket(http, web_a, users["carol"])
        for frame, code in [
            ("{oops", "bad_json"),
            ('{"type": "fly"}', "unknown_type"),
            (json.dumps({"type": "ping", "pad": "x" * 70_000}), "too_large"),
            ('{"type": "subscribe", "topic": ""}', "invalid"),
        ]:
            answer = await bob.request(frame, "pong")
            assert answer["code"] == code
        assert (await bob.request({"type": "ping"}, "pong"))["type"] == "pong"
        # Beyond Daphne's own 1 MiB limit the connection is dropped (1009, or 1006 when the client is
        # still writing the frame as the server hangs up); others carry on.
        await bob.send(json.dumps({"type": "ping", "pad": "x" * (1024 * 1024 + 10)}))
        await bob.wait_for(lambda s: s.closed_code is not None, what="close")
        assert bob.closed_code in (1009, 1006)
        note = await publish(http, web_a, users["alice"], {"user": "carol", "event": "still-here"})
        await carol.wait_for(lambda s: any(m["id"] == note["id"] for m in s.messages), what="carol's message")
        await carol.close()


async def test_an_instance_without_a_broker_answers_503_quickly_and_is_not_ready(cluster, users):
    web = cluster.add_web(AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    async with httpx.AsyncClient(timeout=20) as http:

        async def healthz() -> httpx.Response | None:
            try:
                return await http.get(f"{web.url}/healthz")
            except httpx.TransportError:
                return None

        health = await eventually(healthz, 30, "the web instance to answer")
        assert health.status_code == 200
        assert (await http.get(f"{web.url}/readyz")).status_code == 503
        started = time.monotonic()
        response = await post_message(http, web, users["alice"], {"topic": "t"})
        assert response.status_code == 503 and "detail" in response.json()
        assert time.monotonic() - started < 10, "a down broker must not make the API hang"
        # Sockets still open; a `send` gets `unavailable`, never a receipt.
        bob = await open_socket(http, web, users["bob"])
        answer = await bob.request({"type": "send", "ref": "r1", "event": "echo", "payload": 1}, "receipt")
        assert (answer["type"], answer["code"], answer["ref"]) == ("error", "unavailable", "r1")
        await bob.close()


async def test_frames_of_every_length_class_arrive_intact(two_webs, users):
    """Fan-out frames are built once per message: short, 16-bit and 64-bit lengths all parse."""
    web_a, web_b = two_webs
    async with httpx.AsyncClient(timeout=20) as http:
        bob = await open_socket(http, web_b, users["bob"])
        sizes = [1, 200, 65_000]  # frame lengths < 126, < 65536 and >= 65536 with the envelope
        for size in sizes:
            await publish(
                http, web_a, users["alice"], {"user": "bob", "event": "size", "payload": "x" * size}
            )
        await bob.wait_for(lambda s: len(s.messages) == len(sizes), what="three sizes")
        assert [len(m["payload"]) for m in bob.messages] == sizes
        assert (await bob.request({"type": "ping"}, "pong"))["type"] == "pong"
        await bob.close()
