"""Broker helpers for tests: unique namespaces, and cleaning up what a test declared."""

import asyncio
import uuid

import aio_pika
from django.conf import settings

from notifications.broker import Topology


def new_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


async def queue_stats(name: str, url: str | None = None) -> tuple[int, int] | None:
    """(messages, consumers) of a queue, or None if it does not exist."""
    connection = await aio_pika.connect(url or settings.AMQP_URL)
    try:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return None
        result = queue.declaration_result
        return result.message_count, result.consumer_count
    finally:
        await connection.close()


async def delete_namespace(namespace: str, instance_ids: list[str]) -> None:
    """Delete the queues and exchange a test's deployment declared."""
    topology = Topology(namespace)
    connection = await aio_pika.connect(settings.AMQP_URL)
    try:
        for name in topology.all_queue_names(instance_ids):
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except aio_pika.exceptions.AMQPError:
                pass
        channel = await connection.channel()
        try:
            await channel.exchange_delete(topology.broadcast_exchange)
        except aio_pika.exceptions.AMQPError:
            pass
    finally:
        await connection.close()


def delete_namespace_sync(namespace: str, instance_ids: list[str]) -> None:
    asyncio.run(delete_namespace(namespace, instance_ids))
