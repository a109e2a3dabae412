"""Targeted routing across real web instances (CONTRACT §2 "Targeted routing", §3 metrics).

A topic or user message reaches only the instances holding a matching socket; broadcasts reach
every instance; `subscribed` is answered once the binding is in place, so a message published
right after it cannot miss the socket.
"""

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import open_socket, post_message, publish
from tests.support.processes import Proc

PUBLISHERS = 8


async def received(http: httpx.AsyncClient, web: Proc) -> float:
    """The instance's `rt_messages_received_total` (messages it took from the broker)."""
    text = (await http.get(f"{web.url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rt_messages_received_total" and sample.labels.get("instance") == web.name:
                return sample.value
    raise KeyError("rt_messages_received_total")


async def counts(http: httpx.AsyncClient, webs: list[Proc]) -> list[float]:
    return [await received(http, web) for web in webs]


async def publish_all(http: httpx.AsyncClient, web: Proc, user, bodies: list[dict]) -> None:
    """Publish `bodies` through `web`, PUBLISHERS at a time; each must be accepted."""
    queue = list(bodies)

    async def publisher() -> None:
        while queue:
            await publish(http, web, user, queue.pop(0))

    await asyncio.gather(*(publisher() for _ in range(PUBLISHERS)))


async def test_topic_and_user_messages_reach_only_the_instances_that_hold_their_sockets(cluster, users):
    webs = [cluster.add_web() for _ in range(4)]
    for web in webs:
        await asyncio.to_thread(web.wait_ready)
    web_a, web_b, web_c, web_d = webs
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web_a, users["bob"])
        await bob.request({"type": "subscribe", "topic": "only-a"}, "subscribed")
        carol_c = await open_socket(http, web_c, users["carol"])
        carol_d = await open_socket(http, web_d, users["carol"])

        before = await counts(http, webs)
        await publish_all(
            http, web_b, users["alice"], [{"topic": "only-a", "payload": n} for n in range(500)]
        )
        await bob.wait_for(lambda s: len(s.messages) >= 500, 60, "500 topic messages")
        after = await counts(http, webs)
        assert [a - b for a, b in zip(after, before, strict=True)] == [500, 0, 0, 0]

        before = after
        await publish_all(http, web_a, users["alice"], [{"user": "carol", "payload": n} for n in range(50)])
        for socket in (carol_c, carol_d):
            await socket.wait_for(lambda s: len(s.messages) >= 50, 60, "50 user messages")
        after = await counts(http, webs)
        assert [a - b for a, b in zip(after, before, strict=True)] == [0, 0, 50, 50]

        before = after
        await publish_all(http, web_b, users["alice"], [{"broadcast": True, "payload": n} for n in range(20)])
        for socket in (bob, carol_c, carol_d):
            await socket.wait_for(
                lambda s: sum(m["stream"] == "broadcast" for m in s.messages) >= 20, 60, "broadcasts"
            )
        after = await counts(http, webs)
        assert [a - b for a, b in zip(after, before, strict=True)] == [20, 20, 20, 20]
        for socket in (bob, carol_c, carol_d):
            await socket.close()


async def test_a_message_published_right_after_subscribed_reaches_the_socket(cluster, users):
    """No race between the binding and the publish: 200 fresh topics, each published at once."""
    # Two frames a topic, 200 topics: above the default socket rate, which is not under test.
    web_a, web_b = cluster.add_web(RT_SOCKET_RATE="1000"), cluster.add_web()
    for web in (web_a, web_b):
        await asyncio.to_thread(web.wait_ready)
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web_a, users["bob"])
        for n in range(200):
            topic = f"fresh-{n}"
            answer = await bob.request({"type": "subscribe", "topic": topic}, "subscribed")
            assert answer["type"] == "subscribed", answer
            response = await post_message(http, web_b, users["alice"], {"topic": topic, "payload": n})
            assert response.status_code == 202, response.text
            # The message arrives while the socket is still subscribed (then it moves on).
            await bob.wait_for(lambda s, n=n: len(s.messages) > n, 10, f"the message to {topic}")
            await bob.send({"type": "unsubscribe", "topic": topic})
        assert [m["payload"] for m in bob.messages] == list(range(200))
        await bob.close()
