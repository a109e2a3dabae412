"""The sweeper: every worker publishes, now and then, what was committed but never confirmed.

See `notifications.services.unconfirmed`. Several workers may sweep the same record at once;
that costs a duplicate the web instances drop (by message id) or the worker skips (a frame
already processed), never a second effect.
"""

import asyncio
import logging
import random

from aio_pika.abc import AbstractExchange
from django.utils import timezone

from consumers_app.outages import OutageWaiter
from notifications import broker, metrics
from notifications.backoff import Stopped
from notifications.broker import Outlets, Topology
from notifications.models import Message
from notifications.services import unconfirmed
from notifications.services.inbound import queue_body
from notifications.services.messages import broker_body, mark_published

logger = logging.getLogger(__name__)

# Seconds between sweeps (jittered, so workers started together do not sweep together).
SWEEP_INTERVAL = 10.0


class Sweeper:
    def __init__(
        self,
        topology: Topology,
        outlets: Outlets,
        default_exchange: AbstractExchange,
        outages: OutageWaiter,
    ) -> None:
        self.topology = topology
        self.outlets = outlets
        self.default_exchange = default_exchange
        self.outages = outages

    async def run(self) -> None:
        """Sweep every SWEEP_INTERVAL seconds until the worker stops."""
        stopping = self.outages.stopping
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), SWEEP_INTERVAL * random.uniform(0.5, 1.5))
                return
            except TimeoutError:
                pass
            try:
                await self.sweep_once()
            except Stopped:
                return
            except Exception:
                logger.exception("sweep failed; trying again at the next one")

    async def _publish_message(self, message: Message) -> None:
        body = broker_body(message)
        await self.outlets.publish(body, str(message.id), broker.routing_key(body))

    async def sweep_once(self) -> tuple[int, int]:
        """Publish the unconfirmed messages and queue the unqueued frames; return how many of each."""
        messages = await self.outages.until_database_recovers(
            "sweeping", "(unconfirmed)", unconfirmed.unconfirmed_messages
        )
        now = timezone.now()
        for message in messages:
            message.published_at = message.published_at or now
            await self.outages.until_broker_recovers(
                str(message.id),
                lambda m=message: self._publish_message(m),  # type: ignore[misc]  # mypy cannot infer a lambda with default arguments
            )
        if messages:
            await self.outages.until_database_recovers(
                "sweeping", "(unconfirmed)", lambda: mark_published(messages)
            )
            metrics.messages_swept.inc(len(messages))
            logger.warning("swept %d messages the broker had never confirmed", len(messages))

        frames = await self.outages.until_database_recovers(
            "sweeping", "(unqueued)", unconfirmed.unqueued_frames
        )
        for frame in frames:
            await self.outages.until_broker_recovers(
                str(frame.id),
                lambda f=frame: broker.publish_to_queue(  # type: ignore[misc]  # mypy cannot infer a lambda with default arguments
                    self.default_exchange, self.topology.inbound_queue, queue_body(f), message_id=str(f.id)
                ),
            )
        if frames:
            await self.outages.until_database_recovers(
                "sweeping", "(unqueued)", lambda: unconfirmed.mark_swept_frames([f.id for f in frames])
            )
            metrics.inbound_swept.inc(len(frames))
            logger.warning("swept %d inbound frames the broker had never confirmed", len(frames))
        return len(messages), len(frames)
