"""The inbound worker: competing consumers of `<ns>.inbound` (aio-pika, manual acks, no Celery).

The worker only decodes, hands batches of frames to `processing.process_batch` in a thread,
publishes the replies, and settles each delivery. Handler errors are retried through delay
queues, then dead-lettered; errors of the infrastructure (database, broker) are waited out with
backoff while the frames stay unacked, so they never spend a frame's attempts.

A broker message holds one frame or several (`broker.pack`: a busy web instance queues the
frames that arrived together as one message). `--concurrency N` gives N lanes; each lane takes
whatever messages are waiting (up to BATCH_MESSAGES) and processes all their frames in one
transaction in its own thread, then publishes all their replies together. Under load that makes
one commit and one broker message per batch rather than several per frame; a lone frame still
goes alone, at once. A message of several frames that comes back (its worker died or stopped)
is split into one message per frame, so a frame that kills its worker takes no other down with
it and is dead-lettered on its own.
"""

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from consumers_app.processing import (
    INFRASTRUCTURE_ERRORS,
    Outcome,
    Verdict,
    Work,
    mark_dead,
    mark_replies_published,
    process_batch,
)
from notifications import broker, metrics
from notifications.broker import BrokerUnavailable
from notifications.models import Message
from notifications.services.messages import broker_body

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Broker messages one lane processes in one transaction at most. Larger batches commit less
# often, but a slow handler holds up the rest of its batch.
BATCH_MESSAGES = 8
# Replies per broker message at most (they are published together, see `broker.pack`).
REPLIES_PER_MESSAGE = 64
# Header of a frame split out of a redelivered message: the redeliveries it had as part of it.
REDELIVERIES_HEADER = "x-rt-redeliveries"
# Longest wait between two tries while the database or broker is down.
INFRA_BACKOFF_MAX = 30.0
# Seconds a stopping worker lets in-flight frames finish before handing them back.
STOP_GRACE_SECONDS = 25.0
# A frame redelivered this often has killed its workers (they died before they could record
# anything): it is dead-lettered without running its handler again.
POISON_REDELIVERIES = 10


class InboundWorker:
    def __init__(self, concurrency: int = 4, worker_id: str | None = None) -> None:
        self.concurrency = concurrency
        self.worker_id = worker_id or settings.RT_INSTANCE_ID
        self.topology = broker.current_topology()
        self.queue_name = self.topology.inbound_queue
        self.stopping = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="inbound")
        self.waiting: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.connection: AbstractRobustConnection | None = None
        self._broadcast: AbstractExchange | None = None
        self._default: AbstractExchange | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until `stop()`, then finish or hand back in-flight frames."""
        try:
            self.connection = await broker.connect(self.stopping)
        except asyncio.CancelledError:
            return
        lanes: list[asyncio.Task] = []
        try:
            setup = await self.connection.channel()
            await broker.declare_topology(setup, self.topology)
            await setup.close()

            publish = await self.connection.channel(publisher_confirms=True)
            self._broadcast = await broker.declare_broadcast(publish, self.topology)
            self._default = publish.default_exchange

            consume = await self.connection.channel()
            # A full batch per lane: frames beyond that wait in the queue, where another worker
            # can take them, rather than in this worker's memory.
            await consume.set_qos(prefetch_count=self.concurrency * BATCH_MESSAGES)
            queue = await broker.declare_inbound(consume, self.topology)
            lanes = [asyncio.create_task(self._lane(), name=f"lane-{n}") for n in range(self.concurrency)]
            tag = await queue.consume(self._on_message)
            metrics.broker_connected.set(1)
            logger.info("worker %s consuming %s with %d lanes", self.worker_id, queue.name, self.concurrency)
            await self.stopping.wait()

            logger.info("worker %s stopping: taking no new frames", self.worker_id)
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            await asyncio.wait(lanes, timeout=STOP_GRACE_SECONDS)
        finally:
            for lane in lanes:
                lane.cancel()
            # Closing the channel hands every frame still unacked back to the queue.
            with contextlib.suppress(Exception):
                await self.connection.close()
            self.executor.shutdown(wait=False, cancel_futures=True)
            metrics.broker_connected.set(0)
            logger.info("worker %s stopped", self.worker_id)

    def stop(self) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)

    # --- batches -------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await self.waiting.put(message)

    async def _lane(self) -> None:
        """Take what is waiting (a batch) and process it; until the worker stops."""
        while not self.stopping.is_set():
            getter = asyncio.ensure_future(self.waiting.get())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not getter.done():
                getter.cancel()
                return
            batch = [getter.result()]
            while len(batch) < BATCH_MESSAGES and not self.waiting.empty():
                batch.append(self.waiting.get_nowait())
            try:
                await self._handle(batch)
            except _Stopping:
                unsettled = [message for message in batch if not message.processed]
                logger.info("%s: %d messages handed back (worker stopping)", self.queue_name, len(unsettled))
                for message in unsettled:
                    await broker.settle(message.nack(requeue=True), "an inbound delivery")
                return
            except Exception:
                # A bug, not an outage: leave the frames unacked (redelivered after a restart).
                logger.exception("%s: batch of %d frames failed", self.queue_name, len(batch))

    async def _handle(self, messages: list[AbstractIncomingMessage]) -> None:
        deliveries: list[tuple[AbstractIncomingMessage, list[Work]]] = []
        for message in messages:
            items = await self._decode(message)
            if items:
                deliveries.append((message, items))
        work = [item for _, items in deliveries for item in items]
        if not work:
            return
        ids = ", ".join(item.frame_id for item in work[:3]) + (" …" if len(work) > 3 else "")
        outcomes: list[Outcome] = await self._until_infra_recovers(
            "processing", ids, lambda: process_batch(work, self.worker_id)
        )
        replies = [
            reply for outcome in outcomes if outcome.verdict is Verdict.PROCESSED for reply in outcome.replies
        ]
        if replies:
            await self._publish_replies(ids, replies)
        settles: list[Awaitable[None]] = []
        remaining = iter(outcomes)
        for message, items in deliveries:
            settles.append(self._settle(message, items, [next(remaining) for _ in items]))
        await asyncio.gather(*settles)
        processed = [
            item.frame_id
            for item, o in zip(work, outcomes, strict=True)
            if o.changed and o.verdict is Verdict.PROCESSED
        ]
        if processed:
            metrics.inbound_processed.inc(len(processed))
            # One line per batch (a line per frame costs more than echoing it): the ids, in full.
            logger.info(
                "%s: %d inbound processed by %s: %s",
                self.queue_name,
                len(processed),
                self.worker_id,
                " ".join(processed),
            )

    async def _decode(self, message: AbstractIncomingMessage) -> list[Work] | None:
        """The frames of a message; None if it was settled here (undecodable, split, poison)."""
        headers = message.headers or {}
        try:
            bodies = broker.unpack(broker.decode(message.body), broker.FRAMES)
            work = [Work(frame_id=str(body["id"]), body=body) for body in bodies]
            redeliveries = int(headers.get("x-delivery-count") or 0)
            earlier = int(headers.get(REDELIVERIES_HEADER) or 0)
        except (ValueError, KeyError, TypeError) as exc:
            logger.error(
                "%s: undecodable message %s dead-lettered: %s", self.queue_name, message.message_id, exc
            )
            await broker.settle(message.reject(requeue=False), "an inbound delivery")
            return None
        if redeliveries and len(work) > 1:
            await self._split(message, work, redeliveries + earlier)
            return None
        for item in work:
            item.redeliveries = redeliveries + earlier
        if len(work) == 1 and work[0].redeliveries >= POISON_REDELIVERIES:
            (item,) = work
            error = f"redelivered {item.redeliveries} times: its workers died while processing it"
            logger.error("%s: inbound %s dead-lettered: %s", self.queue_name, item.frame_id, error)
            await self._until_infra_recovers(
                "mark dead", item.frame_id, lambda: mark_dead(item.frame_id, error)
            )
            metrics.inbound_dead.inc()
            await self._dead_letter(item, error, item.redeliveries)
            await broker.settle(message.ack(), "an inbound delivery")
            return None
        return work

    async def _split(self, message: AbstractIncomingMessage, work: list[Work], redeliveries: int) -> None:
        """Requeue a returned message's frames one per message, carrying its redeliveries."""
        logger.warning(
            "%s: message %s of %d frames came back (redelivered %d times): requeued one by one",
            self.queue_name,
            message.message_id,
            len(work),
            redeliveries,
        )
        headers = {REDELIVERIES_HEADER: redeliveries}
        await asyncio.gather(*(self._send_frame(item, self.queue_name, headers) for item in work))
        await broker.settle(message.ack(), "an inbound delivery")

    async def _settle(
        self, message: AbstractIncomingMessage, items: list[Work], outcomes: list[Outcome]
    ) -> None:
        """Do what each frame's outcome asks (retry, dead-letter), then ack the message."""
        await asyncio.gather(
            *(self._follow_up(item, outcome) for item, outcome in zip(items, outcomes, strict=True))
        )
        await broker.settle(message.ack(), "an inbound delivery")

    async def _follow_up(self, item: Work, outcome: Outcome) -> None:
        event = item.body.get("event")
        if outcome.verdict is Verdict.RETRY:
            metrics.inbound_failed.inc()
            logger.warning(
                "%s: inbound %s (%s) failed attempt %d (%s); retrying in %ds",
                self.queue_name,
                item.frame_id,
                event,
                outcome.attempts,
                outcome.error,
                outcome.delay,
            )
            await self._send_frame(item, self.topology.retry_queue(outcome.delay))
        elif outcome.verdict is Verdict.DEAD:
            metrics.inbound_failed.inc()
            metrics.inbound_dead.inc()
            logger.error(
                "%s: inbound %s (%s) dead after %d attempts: %s",
                self.queue_name,
                item.frame_id,
                event,
                outcome.attempts,
                outcome.error,
            )
            await self._dead_letter(item, outcome.error, outcome.attempts)

    async def _dead_letter(self, item: Work, error: str, attempts: int) -> None:
        """Put the frame, alone, in `<ns>.inbound.dead` (its message may hold others that live)."""
        headers = {"x-rt-error": error[:1000], "x-rt-attempts": attempts}
        await self._send_frame(item, self.topology.dead_queue, headers)

    async def _send_frame(self, item: Work, queue: str, headers: dict[str, Any] | None = None) -> None:
        """Publish one frame, alone, to `queue` (confirmed; waits out a broker outage)."""
        await self._until_broker_recovers(
            item.frame_id,
            lambda: broker.publish(
                self._default,
                item.body,
                message_id=item.frame_id,
                routing_key=queue,
                mandatory=True,
                headers=headers,
            ),
        )

    async def _publish_replies(self, ids: str, replies: list[Message]) -> None:
        """Publish a batch's replies, several per broker message, then record them published."""
        published_at = timezone.now()
        for reply in replies:
            reply.published_at = reply.published_at or published_at

        async def publish_chunk(chunk: list[Message]) -> None:
            body = broker.pack(broker.MESSAGES, [broker_body(reply) for reply in chunk])
            message_id = str(chunk[0].id) if len(chunk) == 1 else f"batch-{uuid.uuid4()}"
            await self._until_broker_recovers(
                ids, lambda: broker.publish(self._broadcast, body, message_id=message_id)
            )

        await asyncio.gather(
            *(
                publish_chunk(replies[start : start + REPLIES_PER_MESSAGE])
                for start in range(0, len(replies), REPLIES_PER_MESSAGE)
            )
        )
        metrics.messages_published.inc(len(replies))
        await self._until_infra_recovers("recording replies", ids, lambda: mark_replies_published(replies))

    # --- waiting out outages -------------------------------------------------------------

    async def _in_thread(self, function: Callable[[], T]) -> T:
        def run() -> T:
            close_old_connections()
            try:
                return function()
            finally:
                close_old_connections()

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    async def _until_infra_recovers(self, what: str, frames: str, function: Callable[[], T]) -> T:
        delay = 0.5
        while True:
            try:
                return await self._in_thread(function)
            except INFRASTRUCTURE_ERRORS as exc:
                logger.warning(
                    "%s: database error during %s of inbound %s (%s); retrying in %.1fs",
                    self.queue_name,
                    what,
                    frames,
                    exc,
                    delay,
                )
            delay = await self._backoff(delay)

    async def _until_broker_recovers(self, frames: str, publish: Callable[[], Awaitable[Any]]) -> None:
        delay = 0.5
        while True:
            try:
                await publish()
                return
            except BrokerUnavailable as exc:
                logger.warning(
                    "%s: cannot publish for inbound %s (%s); retrying in %.1fs",
                    self.queue_name,
                    frames,
                    exc,
                    delay,
                )
            delay = await self._backoff(delay)

    async def _backoff(self, delay: float) -> float:
        if self.stopping.is_set():
            raise _Stopping()
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=delay)
        except TimeoutError:
            return min(INFRA_BACKOFF_MAX, delay * 2)
        raise _Stopping()


class _Stopping(Exception):
    """The worker is stopping while waiting out an outage: hand the frames back."""
