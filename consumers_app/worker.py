"""The inbound worker's lanes: competing consumers of `<ns>.inbound` (aio-pika, manual acks).

A lane takes the broker messages waiting (up to BATCH_MESSAGES; a busy web instance packs
several frames into one, see `broker.pack`), decodes them, hands all their frames to
`processing.process_batch` in a thread (one transaction), publishes the replies, and has the
`Settler` settle each message. One lane takes batches at a time, in turns, and another joins only
while the running batches are slow (`lane_gate`): small batches each pay a batch's whole cost.
Outages of the database or broker are waited out (`outages`);
whatever else goes wrong with a batch is retried message by message, and a message that still
fails is split into its frames or dead-lettered with the reason, never left unacked.
"""

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from django.conf import settings

from consumers_app.inbound_messages import read_frames, redeliveries
from consumers_app.lane_gate import LaneGate
from consumers_app.leases import LeaseRenewer, counter_value
from consumers_app.outages import OutageWaiter
from consumers_app.processing import Outcome, Verdict, Work, process_batch, work_from_body
from consumers_app.replies import publish_replies
from consumers_app.settling import Settler, header_int
from consumers_app.sweeper import Sweeper
from notifications import broker, metrics
from notifications.backoff import Stopped
from notifications.services import inbound as inbound_service
from notifications.services.presence import end_lease

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Broker messages one lane processes in one transaction at most (each up to
# `inbound_submitter.FRAMES_PER_MESSAGE` frames: 512 in all). Larger batches commit less often,
# but a slow handler holds up the rest of its batch.
BATCH_MESSAGES = 4
# Seconds a batch runs before another lane may start one beside it (see `lane_gate`): longer
# than a batch takes under load, short enough that a slow handler holds up little behind it.
SLOW_BATCH_SECONDS = 0.5
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
        self.outages = OutageWaiter(self.queue_name, self.executor, self.stopping)
        self.waiting: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.gate = LaneGate(SLOW_BATCH_SECONDS)
        self.connection: AbstractRobustConnection | None = None
        self.settler: Settler | None = None
        self._outlets: broker.Outlets | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until `stop()`, then finish or hand back in-flight frames."""
        try:
            self.connection = await broker.connect(self.stopping)
        except asyncio.CancelledError:
            return
        lanes: list[asyncio.Task[None]] = []
        chores: list[asyncio.Task[None]] = []  # run beside the lanes until the worker stops
        try:
            setup = await self.connection.channel()
            await broker.declare_topology(setup, self.topology)
            await setup.close()

            publish = await self.connection.channel(publisher_confirms=True)
            self._outlets = await broker.declare_outlets(publish, self.topology)
            self.settler = Settler(self.topology, publish.default_exchange, self.outages)

            consume = await self.connection.channel()
            # A full batch per lane: frames beyond that wait in the queue, where another worker
            # can take them, rather than in this worker's memory.
            await consume.set_qos(prefetch_count=self.concurrency * BATCH_MESSAGES)
            queue = await broker.declare_inbound(consume, self.topology)
            lanes = [asyncio.create_task(self._lane(), name=f"lane-{n}") for n in range(self.concurrency)]
            sweeper = Sweeper(self.topology, self._outlets, publish.default_exchange, self.outages)
            chores = [
                asyncio.create_task(sweeper.run(), name="sweeper"),
                asyncio.create_task(self._keep_lease(), name="lease"),
            ]
            tag = await queue.consume(self._on_message)
            metrics.broker_connected.set(1)
            logger.info("worker %s consuming %s with %d lanes", self.worker_id, queue.name, self.concurrency)
            await self.stopping.wait()

            logger.info("worker %s stopping: taking no new frames", self.worker_id)
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            await asyncio.wait(lanes, timeout=STOP_GRACE_SECONDS)
        finally:
            for task in lanes + chores:
                task.cancel()
            # Closing the channel hands every frame still unacked back to the queue.
            with contextlib.suppress(Exception):
                await self.connection.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.outages.in_thread(lambda: end_lease(self.worker_id)), 5.0)
            self.executor.shutdown(wait=False, cancel_futures=True)
            metrics.broker_connected.set(0)
            logger.info("worker %s stopped", self.worker_id)

    def stop(self) -> None:
        self.stopping.set()

    async def _keep_lease(self) -> None:
        """The worker's lease, for the admin's overview (a worker owns no presence)."""
        lease = LeaseRenewer(self.worker_id, "worker", self._lease_stats)
        try:
            await lease.renew()
        except Exception as exc:
            logger.warning("could not register this worker's lease: %s", exc)
        await lease.run()

    def _lease_stats(self) -> dict[str, Any]:
        return {
            "lanes": self.concurrency,
            "waiting": self.waiting.qsize(),
            "processed": counter_value("rt_inbound_processed"),
            "failed": counter_value("rt_inbound_failed"),
            "dead": counter_value("rt_inbound_dead"),
        }

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)

    # --- lanes ---------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await self.waiting.put(message)

    async def _lane(self) -> None:
        """Take what is waiting (a batch) and process it, when the gate gives this lane a turn;
        until the worker stops."""
        while not self.stopping.is_set():
            turn = await self._unless_stopping(self.gate.take_turn())
            if turn is None:
                return
            try:
                first = await self._unless_stopping(self.waiting.get())
                if first is None:
                    return
                batch = [first]
                while len(batch) < BATCH_MESSAGES and not self.waiting.empty():
                    batch.append(self.waiting.get_nowait())
                self.gate.started(turn)
                try:
                    await self._handle_isolated(batch)
                except Stopped:
                    logger.info("%s: %d messages handed back (worker stopping)", self.queue_name, len(batch))
                    await self._settler.hand_back(batch)
                    return
            finally:
                self.gate.done(turn)

    async def _unless_stopping(self, awaitable: Awaitable[T]) -> T | None:
        """What `awaitable` gives, or None if the worker stops first."""
        result = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({result, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not result.done():
            result.cancel()
            return None
        return result.result()

    async def _handle_isolated(self, batch: list[AbstractIncomingMessage]) -> None:
        """Handle a batch; if it fails in a way nobody expected, each message alone, and a
        message that still fails is split into its frames or dead-lettered with the reason."""
        try:
            await self._handle(batch)
            return
        except Stopped:
            raise
        except Exception as exc:
            logger.exception("%s: batch of %d messages failed", self.queue_name, len(batch))
            if len(batch) == 1:
                await self._give_up(batch[0], exc)
                return
        for message in batch:
            if message.processed:
                continue
            try:
                await self._handle([message])
            except Stopped:
                raise
            except Exception as exc:
                logger.exception("%s: message %s failed alone", self.queue_name, message.message_id)
                await self._give_up(message, exc)

    async def _give_up(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        if message.processed:
            return
        error = f"{type(exc).__name__}: {exc}"
        work = self._frames_of(message)
        if work is not None and len(work) > 1:
            await self._settler.split(message, work, redeliveries(message))
            return
        if work:
            (item,) = work
            await self.outages.until_database_recovers(
                "mark dead", item.frame_id, lambda: inbound_service.mark_dead(item.frame_id, error)
            )
        await self._settler.dead_letter_message(message, error)

    @property
    def _settler(self) -> Settler:
        assert self.settler is not None, "the worker is not connected"
        return self.settler

    # --- one batch -----------------------------------------------------------------------

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
        outcomes: list[Outcome] = await self.outages.until_database_recovers(
            "processing", ids, lambda: process_batch(work, self.worker_id)
        )
        replies = [
            reply for outcome in outcomes if outcome.verdict is Verdict.PROCESSED for reply in outcome.replies
        ]
        if replies:
            assert self._outlets is not None, "the worker is not connected"
            await publish_replies(self._outlets, self.outages, ids, replies)
        remaining = iter(outcomes)
        await asyncio.gather(
            *(
                self._settler.settle(message, items, [next(remaining) for _ in items])
                for message, items in deliveries
            )
        )
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

    def _frames_of(self, message: AbstractIncomingMessage) -> list[Work] | None:
        """The frames a message carries, or None if it cannot be read."""
        try:
            return read_frames(message)
        except (ValueError, TypeError):
            return None

    async def _decode(self, message: AbstractIncomingMessage) -> list[Work] | None:
        """The frames of a message; None if it was settled here (unreadable, split, poison).

        A frame of the message that is not one a socket queued is dead-lettered alone; the
        others go on.
        """
        try:
            bodies = broker.unpack(broker.decode(message.body), broker.FRAMES)
        except (ValueError, TypeError) as exc:
            await self._settler.dead_letter_message(message, f"unreadable: {exc}")
            return None
        work: list[Work] = []
        unreadable: list[tuple[Any, str]] = []
        earlier = redeliveries(message)
        for body in bodies:
            try:
                work.append(work_from_body(body, earlier))
            except ValueError as exc:
                unreadable.append((body, f"unreadable: {exc}"))
        if not work:
            await self._settler.dead_letter_message(message, unreadable[0][1])
            return None
        for body, error in unreadable:
            await self._settler.dead_letter_item(body, error, str(message.message_id))
        if len(work) > 1 and header_int(message, "x-delivery-count"):
            # It came back (its worker died or stopped): its frames go on one by one, so a frame
            # that kills its worker takes no other down with it.
            await self._settler.split(message, work, earlier)
            return None
        if len(work) == 1 and earlier >= POISON_REDELIVERIES:
            (item,) = work
            error = f"redelivered {earlier} times: its workers died while processing it"
            logger.error("%s: inbound %s dead-lettered: %s", self.queue_name, item.frame_id, error)
            await self.outages.until_database_recovers(
                "mark dead", item.frame_id, lambda: inbound_service.mark_dead(item.frame_id, error)
            )
            await self._settler.dead_letter(item, error, earlier)
            await self._settler.ack(message)
            return None
        return work
