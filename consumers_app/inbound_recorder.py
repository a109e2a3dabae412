"""Records `send` frames of all sockets of an instance in shared batches.

Each inbound frame must be in the database before it is queued (its receipt promises a record an
admin can find). One insert per frame would serialise every socket of the instance on one
database thread; instead the frames that arrive while a batch is being written form the next
batch, so under load many frames share one insert and one commit, and alone a frame waits for
nobody.
"""

import asyncio
import logging

from channels.db import database_sync_to_async

from notifications.models import InboundFrame
from notifications.services.inbound import record_inbound_batch

logger = logging.getLogger(__name__)

# Largest batch written at once (rows).
MAX_BATCH = 500


class InboundRecorder:
    def __init__(self) -> None:
        self._pending: list[tuple[InboundFrame, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def record(self, frame: InboundFrame) -> None:
        """Store `frame` (unsaved, id already set); raise the database's error if it fails."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((frame, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_all())
        await done

    async def _write_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                await database_sync_to_async(record_inbound_batch)([frame for frame, _ in batch])
            except Exception as exc:
                logger.warning("could not record %d inbound frames: %s", len(batch), exc)
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)
