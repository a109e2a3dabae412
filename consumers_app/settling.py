"""Settling inbound broker messages: what becomes of each one once its frames were processed.

"Settle" means one thing here: end the broker's hold on a delivery, exactly once, by an ack
after whatever its frames need (a retry copy in a delay queue, a dead letter), or by handing it
back. Every publish here is confirmed and waits out a broker outage, so a delivery is acked only
once its frames are safe elsewhere.
"""

import asyncio
import logging
from typing import Any

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from consumers_app.outages import OutageWaiter
from consumers_app.processing import Outcome, Verdict, Work
from notifications import broker, jsonutil, metrics
from notifications.broker import Topology

logger = logging.getLogger(__name__)

# Header of a frame split out of a redelivered message: the redeliveries it had as part of it.
REDELIVERIES_HEADER = "x-rt-redeliveries"
# Headers of a dead letter: why it died, and after how many attempts.
ERROR_HEADER = "x-rt-error"
ATTEMPTS_HEADER = "x-rt-attempts"
# AMQP header values are short strings: the error's first characters say enough.
ERROR_HEADER_CHARS = 1000


class Settler:
    def __init__(self, topology: Topology, exchange: AbstractExchange, outages: OutageWaiter) -> None:
        self.topology = topology
        self.exchange = exchange  # the default exchange: routing key = queue name
        self.outages = outages

    async def ack(self, message: AbstractIncomingMessage) -> None:
        await broker.settle(message.ack(), "an inbound delivery")

    async def hand_back(self, messages: list[AbstractIncomingMessage]) -> None:
        """Return unsettled deliveries to the queue (the worker is stopping)."""
        for message in messages:
            if not message.processed:
                await broker.settle(message.nack(requeue=True), "an inbound delivery")

    async def settle(
        self, message: AbstractIncomingMessage, items: list[Work], outcomes: list[Outcome]
    ) -> None:
        """Do what each frame's outcome asks (retry, dead-letter), then ack the message."""
        await asyncio.gather(
            *(self._follow_up(item, outcome) for item, outcome in zip(items, outcomes, strict=True))
        )
        await self.ack(message)

    async def split(self, message: AbstractIncomingMessage, work: list[Work], redeliveries: int) -> None:
        """Requeue a message's frames one per message, carrying its redeliveries, then ack it:
        a frame that kills its worker, or fails in a way nobody expected, then fails alone."""
        logger.warning(
            "%s: message %s of %d frames requeued one by one (redelivered %d times)",
            self.topology.inbound_queue,
            message.message_id,
            len(work),
            redeliveries,
        )
        headers = {REDELIVERIES_HEADER: redeliveries}
        await asyncio.gather(*(self._send_frame(item, self.topology.inbound_queue, headers) for item in work))
        await self.ack(message)

    async def dead_letter(self, item: Work, error: str, attempts: int) -> None:
        """Put the frame, alone, in `<ns>.inbound.dead` (its message may hold others that live)."""
        metrics.inbound_dead.inc()
        await self._send_frame(item, self.topology.dead_queue, _dead_headers(error, attempts))

    async def dead_letter_message(self, message: AbstractIncomingMessage, error: str) -> None:
        """Move a whole delivery, as it came, to `<ns>.inbound.dead` with the reason, then ack it."""
        logger.error(
            "%s: message %s dead-lettered: %s", self.topology.inbound_queue, message.message_id, error
        )
        metrics.inbound_dead.inc()
        attempts = header_int(message, "x-delivery-count")
        await self._to_queue(
            self.topology.dead_queue,
            message.body,
            str(message.message_id or "unreadable"),
            _dead_headers(error, attempts),
        )
        await self.ack(message)

    async def dead_letter_item(self, item: Any, error: str, message_id: str) -> None:
        """Put one unreadable item of a message, alone, in `<ns>.inbound.dead` with the reason."""
        logger.error(
            "%s: an item of message %s dead-lettered: %s", self.topology.inbound_queue, message_id, error
        )
        metrics.inbound_dead.inc()
        await self._to_queue(
            self.topology.dead_queue, jsonutil.dumps(item), f"{message_id}-item", _dead_headers(error, 0)
        )

    async def _follow_up(self, item: Work, outcome: Outcome) -> None:
        event = item.body.get("event")
        if outcome.verdict is Verdict.RETRY:
            metrics.inbound_failed.inc()
            logger.warning(
                "%s: inbound %s (%s) failed attempt %d (%s); retrying in %ds",
                self.topology.inbound_queue,
                item.frame_id,
                event,
                outcome.attempts,
                outcome.error,
                outcome.delay,
            )
            await self._send_frame(item, self.topology.retry_queue(outcome.delay))
        elif outcome.verdict is Verdict.DEAD:
            metrics.inbound_failed.inc()
            logger.error(
                "%s: inbound %s (%s) dead after %d attempts: %s",
                self.topology.inbound_queue,
                item.frame_id,
                event,
                outcome.attempts,
                outcome.error,
            )
            await self.dead_letter(item, outcome.error, outcome.attempts)

    async def _send_frame(self, item: Work, queue: str, headers: dict[str, Any] | None = None) -> None:
        """Publish one frame, alone, to `queue`."""
        await self._to_queue(queue, item.body, item.frame_id, headers)

    async def _to_queue(
        self, queue: str, body: Any, message_id: str, headers: dict[str, Any] | None = None
    ) -> None:
        """Publish to `queue`, confirmed, waiting out a broker outage."""
        await self.outages.until_broker_recovers(
            message_id,
            lambda: broker.publish_to_queue(
                self.exchange, queue, body, message_id=message_id, headers=headers
            ),
        )


def header_int(message: AbstractIncomingMessage, name: str) -> int:
    """A count in a message's headers; 0 when absent or not a positive integer (a header is
    anyone's to write, and a forged one must not fail the settling)."""
    value = (message.headers or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _dead_headers(error: str, attempts: int) -> dict[str, Any]:
    return {ERROR_HEADER: error[:ERROR_HEADER_CHARS], ATTEMPTS_HEADER: attempts}
