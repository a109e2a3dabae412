"""A web instance whose queue is deleted under it (the broker cancels its consumer; its connection
stays up, as when the node that held the queue dies while the instance is connected to another):
it consumes again, and what was routed nowhere meanwhile still reaches its sockets, in order."""

import aio_pika
import httpx
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from notifications.broker import Topology
from notifications.services.messages import create_message, mark_published
from tests.support.clients import open_socket, publish
from tests.support.waiting import eventually

# Seconds for the instance to consume again and read back what it missed (two shared cores).
RESTORE_TIMEOUT = 30.0


def routed_nowhere(topic: str, count: int) -> list[int]:
    """Messages published while the instance had no queue: stored, numbered and confirmed, as a
    publisher elsewhere would leave them, but never delivered to this instance. Their seqs."""
    seqs = []
    for n in range(count):
        with transaction.atomic():
            message = create_message(topic=topic, event="missed", payload={"n": n})
        message.published_at = timezone.now()
        mark_published([message])
        seqs.append(message.seq)
    return seqs


async def consumers_of(queue_name: str) -> int:
    connection = await aio_pika.connect(settings.AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.consumer_count
    except aio_pika.exceptions.ChannelClosed:
        return 0  # not declared (yet)
    finally:
        await connection.close()


async def test_an_instance_whose_queue_was_deleted_consumes_again_and_reads_back_what_it_missed(
    cluster, users
):
    web = cluster.add_web()
    web.wait_ready()
    topic = "orders-cancel"
    queue_name = Topology(cluster.namespace).instance_queue(web.name)
    async with httpx.AsyncClient(timeout=30) as http:
        sock = await open_socket(http, web, users["bob"])
        subscribed = await sock.request({"type": "subscribe", "topic": topic, "ref": "s"}, "subscribed")
        assert subscribed["type"] == "subscribed", subscribed
        first = await publish(http, web, users["alice"], {"topic": topic, "event": "live", "payload": {}})
        await sock.wait_for(lambda s: len(s.messages) == 1, what="the first message")

        connection = await aio_pika.connect(settings.AMQP_URL)
        try:
            channel = await connection.channel()
            await channel.queue_delete(queue_name)
        finally:
            await connection.close()
        missed = await database_sync_to_async(routed_nowhere)(topic, 3)

        await eventually(
            lambda: consumers_of(queue_name), RESTORE_TIMEOUT, "the instance consuming its queue again"
        )
        await sock.wait_for(
            lambda s: len(s.messages) >= 4, timeout=RESTORE_TIMEOUT, what="the messages routed nowhere"
        )
        seqs = [m["seq"] for m in sock.messages]
        assert seqs == [first["seq"], *missed], seqs
        assert [m["event"] for m in sock.messages] == ["live", "missed", "missed", "missed"]

        # Live again: the next message comes through the restored queue and its binding.
        later = await publish(http, web, users["alice"], {"topic": topic, "event": "after", "payload": {}})
        await sock.wait_for(lambda s: len(s.messages) == 5, what="the message after the restore")
        assert sock.messages[-1]["seq"] == later["seq"] == missed[-1] + 1
        await sock.close()
