"""The sweeper publishes what was committed but never confirmed (in-process, real broker and database)."""

import asyncio
import datetime
from concurrent.futures import ThreadPoolExecutor

from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from consumers_app.outages import OutageWaiter
from consumers_app.sweeper import Sweeper
from notifications import broker
from notifications.models import InboundFrame, Message, PendingConfirm
from notifications.services.messages import create_message
from notifications.services.unconfirmed import SWEPT_NOTE
from tests.support.broker import queue_stats
from tests.test_consumer import connect


def _stranded_records(age_seconds: float) -> tuple[Message, InboundFrame, Message]:
    """A message and a frame committed `age_seconds` ago and never confirmed, and a young message."""
    bob = User.objects.get(username="bob")
    with transaction.atomic():
        old = create_message(user=bob, event="stranded", payload={"n": 1})
    frame = InboundFrame.objects.create(user=bob, event="echo", payload={"n": 2})
    with transaction.atomic():
        young = create_message(user=bob, event="young", payload={"n": 3})
    past = timezone.now() - datetime.timedelta(seconds=age_seconds)
    PendingConfirm.objects.filter(created_at=old.created_at).update(created_at=past)
    Message.objects.filter(id=old.id).update(created_at=past)
    InboundFrame.objects.filter(id=frame.id).update(accepted_at=past)
    return old, frame, young


async def test_sweep_publishes_unconfirmed_messages_and_queues_unqueued_frames_once(bridge, users, settings):
    settings.RT_SWEEP_GRACE_SECONDS = 30
    bob, _ = await connect("bob")
    old, frame, young = await database_sync_to_async(_stranded_records)(120)

    connection = await broker.connect()
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = broker.current_topology()
        await broker.declare_topology(channel, topology)
        outlets = await broker.declare_outlets(channel, topology)
        outages = OutageWaiter(topology.inbound_queue, executor, asyncio.Event())
        sweeper = Sweeper(topology, outlets, channel.default_exchange, outages)

        assert await sweeper.sweep_once() == (1, 1)
        delivered = await bob.receive_json_from(timeout=5)
        assert delivered["id"] == str(old.id) and delivered["event"] == "stranded"
        assert await bob.receive_nothing(timeout=0.3)  # the young one is within its grace period

        old_now = await database_sync_to_async(Message.objects.get)(id=old.id)
        assert old_now.status == Message.Status.PUBLISHED and old_now.published_at is not None
        young_now = await database_sync_to_async(Message.objects.get)(id=young.id)
        assert young_now.status == Message.Status.ACCEPTED
        frame_now = await database_sync_to_async(InboundFrame.objects.get)(id=frame.id)
        assert frame_now.status == InboundFrame.Status.ACCEPTED and frame_now.error == SWEPT_NOTE
        assert (await queue_stats(topology.inbound_queue))[0] == 1

        # Swept once: the next sweep finds nothing.
        assert await sweeper.sweep_once() == (0, 0)
        assert (await queue_stats(topology.inbound_queue))[0] == 1
    finally:
        executor.shutdown()
        await connection.close()
        await bob.disconnect()
