"""Broker helpers for tests and benchmarks: namespaces, queue counts, cleaning up a deployment.

Importing this module does not import Django (the benchmarks' orchestrator uses it): only
the functions that need the project's settings or topology import them, when called.

    python -m tests.support.broker NAMESPACE [INSTANCE_ID ...]

deletes what a deployment under NAMESPACE declared, with the settings of the environment.
"""

import asyncio
import sys
import uuid
from collections.abc import Sequence

import aio_pika

from tests.support.processes import START_TIMEOUT, Proc
from tests.support.waiting import wait_until


def new_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def _amqp_url(url: str | None) -> str:
    if url is not None:
        return url
    from django.conf import settings

    return settings.AMQP_URL


async def queue_stats(name: str, url: str | None = None) -> tuple[int, int] | None:
    """(messages, consumers) of a queue, or None if it does not exist (default broker: settings)."""
    connection = await aio_pika.connect(_amqp_url(url))
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


async def exchange_exists(name: str, url: str | None = None) -> bool:
    """Whether an exchange is declared (default broker: settings)."""
    connection = await aio_pika.connect(_amqp_url(url))
    try:
        channel = await connection.channel()
        try:
            await channel.declare_exchange(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        return True
    finally:
        await connection.close()


def wait_consumers(
    queue: str,
    count: int,
    procs: Sequence[Proc] = (),
    url: str | None = None,
    timeout: float = START_TIMEOUT,
) -> None:
    """Until `queue` has `count` consumers or more; fail at once when one of `procs` crashed."""

    def consuming() -> bool:
        for proc in procs:
            if proc.crashed:
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log_tail()}")
        stats = asyncio.run(queue_stats(queue, url))
        return stats is not None and stats[1] >= count

    wait_until(consuming, timeout, interval=0.2, what=f"{count} consumer(s) on {queue}")


async def delete_namespace(namespace: str, instance_ids: list[str]) -> None:
    """Delete the queues and exchanges a deployment declared (the broker of the settings)."""
    from django.conf import settings

    from notifications.broker import Topology

    topology = Topology(namespace)
    connection = await aio_pika.connect(settings.AMQP_URL)
    try:
        for name in topology.all_queue_names(instance_ids):
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except aio_pika.exceptions.AMQPError:
                pass
        for exchange in topology.all_exchange_names():
            channel = await connection.channel()
            try:
                await channel.exchange_delete(exchange)
            except aio_pika.exceptions.AMQPError:
                pass
    finally:
        await connection.close()


def delete_namespace_sync(namespace: str, instance_ids: list[str]) -> None:
    asyncio.run(delete_namespace(namespace, instance_ids))


def main(argv: list[str]) -> None:
    import django

    django.setup()
    namespace, *instance_ids = argv
    delete_namespace_sync(namespace, instance_ids)


if __name__ == "__main__":
    main(sys.argv[1:])
