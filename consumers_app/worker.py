"""The inbound worker: competing consumers of `<ns>.inbound` (aio-pika, manual acks, no Celery).

The worker only decodes, calls `processing.process_frame` in a thread, publishes the replies,
and settles the delivery. Errors of the handler are retried through delay queues, then
dead-lettered; errors of the infrastructure (database, broker) are waited out with backoff while
the frame stays unacked, so they never spend the frame's attempts.
"""

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from consumers_app.processing import INFRASTRUCTURE_ERRORS, Outcome, Verdict, mark_dead, process_frame
from notifications import broker, metrics
from notifications.broker import BrokerUnavailable
from notifications.models import Message
from notifications.services.messages import broker_body, mark_published

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
        self.stopping = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="inbound")
        self.in_flight: set[asyncio.Task] = set()
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
        try:
            setup = await self.connection.channel()
            await broker.declare_topology(setup, self.topology)
            await setup.close()

            publish = await self.connection.channel(publisher_confirms=True)
            self._broadcast = await broker.declare_broadcast(publish, self.topology)
            self._default = publish.default_exchange

            consume = await self.connection.channel()
            # One unacked frame per handler slot: a frame waits in the queue, where another worker
            # can take it, rather than in this worker's memory.
            await consume.set_qos(prefetch_count=self.concurrency)
            queue = await broker.declare_inbound(consume, self.topology)
            tag = await queue.consume(self._on_message)
            metrics.broker_connected.set(1)
            logger.info(
                "worker %s consuming %s with concurrency %d", self.worker_id, queue.name, self.concurrency
            )
            await self.stopping.wait()

            logger.info(
                "worker %s stopping: no new frames, %d in flight", self.worker_id, len(self.in_flight)
            )
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            if self.in_flight:
                await asyncio.wait(set(self.in_flight), timeout=STOP_GRACE_SECONDS)
        finally:
            # Closing the channel hands any frame still unacked back to the queue.
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

    # --- one frame -----------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        self.in_flight.add(task)
        try:
            await self._handle(message)
        finally:
            self.in_flight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        queue = self.topology.inbound_queue
        try:
            body = broker.decode(message.body)
            frame_id = str(body["id"])
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("%s: undecodable message %s dead-lettered: %s", queue, message.message_id, exc)
            await _settle(message.reject(requeue=False))
            return
        crashed = int((message.headers or {}).get("x-delivery-count") or 0)
        if crashed >= POISON_REDELIVERIES:
            error = f"redelivered {crashed} times: its workers died while processing it"
            logger.error("%s: inbound %s dead-lettered: %s", queue, frame_id, error)
            with contextlib.suppress(_Stopping):
                await self._until_infra_recovers("mark dead", frame_id, lambda: mark_dead(frame_id, error))
            await _settle(message.reject(requeue=False))
            return
        try:
            outcome: Outcome = await self._until_infra_recovers(
                "process", frame_id, lambda: process_frame(frame_id, body, self.worker_id, crashed)
            )
            if outcome.verdict is Verdict.PROCESSED:
                await self._publish_replies(frame_id, outcome.replies)
                metrics.inbound_processed.inc()
                logger.info(
                    "%s: inbound %s (%s) processed by %s", queue, frame_id, body.get("event"), self.worker_id
                )
            elif outcome.verdict is Verdict.RETRY:
                metrics.inbound_failed.inc()
                logger.warning(
                    "%s: inbound %s failed attempt %d (%s); retrying in %ds",
                    queue,
                    frame_id,
                    outcome.attempts,
                    outcome.error,
                    outcome.delay,
                )
                await self._until_broker_recovers(
                    frame_id,
                    lambda: broker.publish(
                        self._default,
                        body,
                        message_id=frame_id,
                        routing_key=self.topology.retry_queue(outcome.delay),
                        mandatory=True,
                    ),
                )
            elif outcome.verdict is Verdict.DEAD:
                metrics.inbound_failed.inc()
                metrics.inbound_dead.inc()
                logger.error(
                    "%s: inbound %s dead after %d attempts: %s",
                    queue,
                    frame_id,
                    outcome.attempts,
                    outcome.error,
                )
                await _settle(message.reject(requeue=False))
                return
        except _Stopping:
            logger.info("%s: inbound %s handed back (worker stopping)", queue, frame_id)
            await _settle(message.nack(requeue=True))
            return
        await _settle(message.ack())

    async def _publish_replies(self, frame_id: str, replies: list[Message]) -> None:
        for reply in replies:
            reply.published_at = timezone.now()
            await self._until_broker_recovers(
                frame_id,
                functools.partial(
                    broker.publish, self._broadcast, broker_body(reply), message_id=str(reply.id)
                ),
            )
            metrics.messages_published.inc()
            await self._until_infra_recovers("record reply", frame_id, lambda r=reply: mark_published(r))

    # --- waiting out outages -------------------------------------------------------------

    async def _in_thread(self, function: Callable[[], T]) -> T:
        def run() -> T:
            close_old_connections()
            try:
                return function()
            finally:
                close_old_connections()

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    async def _until_infra_recovers(self, what: str, frame_id: str, function: Callable[[], T]) -> T:
        delay = 0.5
        while True:
            try:
                return await self._in_thread(function)
            except INFRASTRUCTURE_ERRORS as exc:
                logger.warning(
                    "%s: database error during %s of inbound %s (%s); retrying in %.1fs",
                    self.topology.inbound_queue,
                    what,
                    frame_id,
                    exc,
                    delay,
                )
            delay = await self._backoff(delay)

    async def _until_broker_recovers(self, frame_id: str, publish: Callable[[], Any]) -> None:
        delay = 0.5
        while True:
            try:
                await publish()
                return
            except BrokerUnavailable as exc:
                logger.warning(
                    "%s: cannot publish for inbound %s (%s); retrying in %.1fs",
                    self.topology.inbound_queue,
                    frame_id,
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
    """The worker is stopping while waiting out an outage: hand the frame back."""


async def _settle(operation: Any) -> None:
    try:
        await operation
    except (
        aio_pika.exceptions.ChannelInvalidStateError,
        aio_pika.exceptions.AMQPError,
        ConnectionError,
    ) as exc:
        logger.info("could not settle an inbound delivery (%s); the broker will redeliver it", exc)
