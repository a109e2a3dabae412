"""notifications/broker.py Outlets: a pack for several recipients, routed once to each queue bound
to any of their keys (a real broker; the test's own namespace)."""

import asyncio

import aio_pika

from notifications import broker
from tests.support.broker import delete_namespace


async def test_a_pack_reaches_every_queue_bound_to_one_of_its_keys_without_the_key_list(namespace, settings):
    topology = broker.current_topology()
    connection = await broker.connect()
    try:
        channel = await connection.channel(publisher_confirms=True)
        outlets = await broker.declare_outlets(channel, topology)
        queues = {}
        for key in ("user.1", "user.2", "user.3"):
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(topology.route_exchange, routing_key=key)
            queues[key] = queue

        await outlets.publish(b'{"messages": []}', "pack-1", ["user.1", "user.3", "user.9"])

        async def first(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage | None:
            for _ in range(50):
                message = await queue.get(no_ack=True, fail=False)
                if message is not None:
                    return message
                await asyncio.sleep(0.05)
            return None

        one, three = await first(queues["user.1"]), await first(queues["user.3"])
        assert one is not None and three is not None
        assert one.body == three.body == b'{"messages": []}'
        for message in (one, three):
            # The broker routes by the list and strips it: instances decode no header of
            # up to a thousand keys with every pack.
            assert "BCC" not in (message.headers or {}) and "CC" not in (message.headers or {})
        assert await queues["user.2"].get(no_ack=True, fail=False) is None
    finally:
        await connection.close()
        await delete_namespace(namespace, [settings.RT_INSTANCE_ID])
