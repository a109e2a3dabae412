"""The delivery log writer: buffers deliveries and acks in memory, writes them in batches.

The fan-out path only appends a tuple here; the database sees one bulk insert per interval,
so a slow database slows the log, never the delivery.
"""

import asyncio
import datetime
import logging
import uuid
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from notifications import metrics
from notifications.services import deliveries as services

logger = logging.getLogger(__name__)

# Rows kept while the database is unreachable; past this the oldest are dropped (and logged).
MAX_BUFFERED_ROWS = 500_000


class DeliveryLogWriter:
    """One per web instance; flushed by its own task and once more at shutdown."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.enabled = settings.RT_DELIVERY_LOG_ENABLED
        self.interval = settings.RT_DELIVERY_LOG_INTERVAL
        self._deliveries: list[services.DeliveryRow] = []
        self._acks: list[services.AckRow] = []
        self._task: asyncio.Task | None = None
        self._flush_lock = asyncio.Lock()

    def record_deliveries(self, message_id: uuid.UUID, at: datetime.datetime, sockets: list[Any]) -> None:
        """One message delivered at `at` to `sockets` (each with `user_id` and `connection_id`)."""
        if self.enabled:
            instance = self.instance_id
            self._deliveries += [(message_id, s.user_id, s.connection_id, instance, at) for s in sockets]

    def record_ack(self, message_id: uuid.UUID, connection: str, at: datetime.datetime) -> None:
        if self.enabled:
            self._acks.append((message_id, connection, at))

    @property
    def pending(self) -> int:
        return len(self._deliveries) + len(self._acks)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="delivery-log")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:
                logger.exception("delivery log flush failed; keeping %d rows for the next try", self.pending)
                await asyncio.sleep(min(5.0, self.interval * 10))

    async def flush(self) -> None:
        async with self._flush_lock:
            while self._deliveries or self._acks:
                batch = settings.RT_DELIVERY_LOG_BATCH
                deliveries, self._deliveries = self._deliveries[:batch], self._deliveries[batch:]
                acks, self._acks = self._acks[:batch], self._acks[batch:]
                try:
                    await database_sync_to_async(services.write_delivery_log)(deliveries, acks)
                except Exception:
                    # Put them back in front, keeping order, and give up this round.
                    self._deliveries[:0] = deliveries
                    self._acks[:0] = acks
                    self._trim()
                    raise
                metrics.delivery_log_rows.inc(len(deliveries))

    def _trim(self) -> None:
        excess = len(self._deliveries) - MAX_BUFFERED_ROWS
        if excess > 0:
            logger.error("delivery log buffer full: dropping the %d oldest delivery rows", excess)
            del self._deliveries[:excess]
        excess = len(self._acks) - MAX_BUFFERED_ROWS
        if excess > 0:
            logger.error("delivery log buffer full: dropping the %d oldest acks", excess)
            del self._acks[:excess]
