"""Tests and benchmarks clean up after themselves: `delete_namespace` leaves nothing of a
deployment on the shared broker (each run's exchanges stayed behind before it deleted both)."""

import aio_pika

from notifications import broker
from tests.support.broker import delete_namespace, exchange_exists, queue_stats


async def test_delete_namespace_removes_every_queue_and_exchange_a_deployment_declares(namespace, settings):
    topology = broker.current_topology()
    instance = settings.RT_INSTANCE_ID
    connection = await aio_pika.connect(settings.AMQP_URL)
    try:
        channel = await connection.channel()
        await broker.declare_topology(channel, topology)
        await broker.declare_instance_queue(channel, topology, instance)
    finally:
        await connection.close()
    exchanges = topology.all_exchange_names()
    queues = topology.all_queue_names([instance])
    assert [await exchange_exists(name) for name in exchanges] == [True, True]
    assert None not in [await queue_stats(name) for name in queues]

    await delete_namespace(namespace, [instance])

    assert [await exchange_exists(name) for name in exchanges] == [False, False]
    assert [await queue_stats(name) for name in queues] == [None] * len(queues)
