"""Records and queues the `send` frames of all sockets of an instance, in shared batches.

Each inbound frame must be in the database before it is queued (its receipt promises a record an
admin can find), and on the broker before its receipt. One insert and one broker message per
frame would make every frame pay a commit and a confirmed publish of its own; instead the frames
that arrive while a batch is being written form the next batch, so under load many frames share
one insert, one commit and a few broker messages, and alone a frame waits for nobody. Batch k is
published while batch k+1 is written.
"""

import asyncio
import logging

from channels.db import database_sync_to_async
from django.db import InterfaceError, OperationalError

from notifications import broker
from notifications.broker import BrokerUnavailable
from notifications.publishing import Publisher
from notifications.services.inbound import NewInbound, mark_unqueued, queue_body, record_inbound_batch

logger = logging.getLogger(__name__)

# Largest batch written to the database at once (rows).
MAX_BATCH = 500
# Frames per broker message at most: one worker processes a message's frames in one
# transaction, so this bounds what one slow frame can hold up, and what a redelivery repeats.
# Every broker message costs the web instance, the broker and the worker about the same
# whatever it holds: on the echo benchmark, 128 rather than 32 (a busy instance's write batch
# then travels as one or two messages, not four) took ~20 % off the CPU an echo costs.
FRAMES_PER_MESSAGE = 128

Pending = tuple[NewInbound, asyncio.Future[None]]


class InboundSubmitter:
    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._pending: list[Pending] = []
        self._writer: asyncio.Task | None = None
        self._queueing: set[asyncio.Task] = set()

    async def submit(self, frame: NewInbound) -> None:
        """Record and queue `frame`.

        Raises the database's error if it could not be recorded (nothing was queued), or
        BrokerUnavailable if it was recorded but the broker did not take it (it is then `dead`).
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((frame, done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_all())
        await done

    async def _write_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            batch = await self._record(batch)
            for start in range(0, len(batch), FRAMES_PER_MESSAGE):
                task = asyncio.get_running_loop().create_task(
                    self._queue(batch[start : start + FRAMES_PER_MESSAGE])
                )
                self._queueing.add(task)
                task.add_done_callback(self._queueing.discard)

    async def _record(self, batch: list[Pending]) -> list[Pending]:
        """Store the batch; what could not be stored is settled with the error. Returns the rest."""
        try:
            await database_sync_to_async(record_inbound_batch)([frame for frame, _ in batch])
            return batch
        except (OperationalError, InterfaceError) as exc:
            logger.warning("could not record %d inbound frames: %s", len(batch), exc)
            _settle(batch, exc)
            return []
        except Exception as exc:
            if len(batch) == 1:
                logger.warning("could not record inbound frame %s: %s", batch[0][0].id, exc)
                _settle(batch, exc)
                return []
        # One row the database refuses (say, a payload it cannot store) must not fail the
        # frames of other sockets that happened to share its batch: each is tried alone.
        recorded: list[Pending] = []
        for pending in batch:
            recorded += await self._record([pending])
        return recorded

    async def _queue(self, chunk: list[Pending]) -> None:
        encoded: list[tuple[Pending, bytes]] = []
        for pending in chunk:
            try:
                encoded.append((pending, broker.encode(queue_body(pending[0]))))
            except (TypeError, ValueError) as exc:  # the socket checks payloads, so a bug: it fails alone
                logger.exception("inbound frame %s cannot be encoded", pending[0].id)
                await self._not_queued([pending], BrokerUnavailable(f"cannot encode the frame: {exc}"))
        if not encoded:
            return
        sendable = [pending for pending, _ in encoded]
        frames = [frame for frame, _ in sendable]
        message_id = broker.message_id_for([frame.id for frame in frames])
        body = broker.pack_encoded(broker.FRAMES, [body for _, body in encoded])
        try:
            await self._publisher.publish_inbound(body, message_id)
        except Exception as exc:
            if not isinstance(exc, BrokerUnavailable):
                logger.exception("publishing %d inbound frames failed", len(frames))
                exc = BrokerUnavailable(f"{type(exc).__name__}: {exc}")
            await self._not_queued(sendable, exc)
            return
        _settle(sendable, None)

    async def _not_queued(self, chunk: list[Pending], exc: BrokerUnavailable) -> None:
        frames = [frame for frame, _ in chunk]
        logger.warning("%d inbound frames not queued (%s), first %s", len(frames), exc, frames[0].id)
        try:
            await database_sync_to_async(mark_unqueued)(frames, str(exc))
        except Exception as db_exc:
            logger.error("could not mark %d unqueued inbound frames dead: %s", len(frames), db_exc)
        _settle(chunk, exc)


def _settle(chunk: list[Pending], error: Exception | None) -> None:
    for _, done in chunk:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
