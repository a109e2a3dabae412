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


class DeliveryLogWriter:
    """One per web instance; flushed by its own task and once more at shutdown."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.enabled = settings.RT_DELIVERY_LOG_ENABLED
        self.interval = settings.RT_DELIVERY_LOG_INTERVAL
        # Rows kept while the database is slow, down or hanging; past this the oldest are dropped.
        self.max_rows: int = settings.RT_DELIVERY_LOG_MAX_BUFFERED
        self._deliveries: list[services.DeliveryRow] = []
        self._acks: list[services.AckRow] = []
        self._task: asyncio.Task | None = None
        self._flush_lock = asyncio.Lock()

    def record_deliveries(self, message_id: uuid.UUID, at: datetime.datetime, sockets: list[Any]) -> None:
        """One message delivered at `at` to `sockets` (each with `user_id` and `connection_id`)."""
        if self.enabled:
            instance = self.instance_id
            self._deliveries += [(message_id, s.user_id, s.connection_id, instance, at) for s in sockets]
            if len(self._deliveries) > self.max_rows:
                self._trim()

    def record_ack(self, message_id: uuid.UUID, connection: str, at: datetime.datetime) -> None:
        if self.enabled:
            self._acks.append((message_id, connection, at))
            if len(self._acks) > self.max_rows:
                self._trim()

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
        """Keep the buffer within `max_rows` whatever the database does (a hanging flush included).

        Drops a tenth more than the excess, so a full buffer is not trimmed (and logged) at
        every single delivery.
        """
        for rows, what in ((self._deliveries, "delivery rows"), (self._acks, "acks")):
            excess = len(rows) - self.max_rows
            if excess > 0:
                excess += self.max_rows // 10
                logger.error("delivery log buffer full: dropping the %d oldest %s", excess, what)
                metrics.delivery_log_dropped.inc(excess)
                del rows[:excess]
