"""The database reads of a web instance's streams, shared between the sockets that need them.

A reconnect storm (an instance died, its thousand sockets come back here at once) asks for the
same streams many times over. Requests wait while one read is in flight and then go together,
as one `recover_many` call: a stream's position and kept messages are read once per batch,
however many sockets asked (Centrifugo PRO calls this singleflight).
"""

import asyncio
import logging

from channels.db import database_sync_to_async

from notifications import metrics
from notifications.services.streams import Recovery, recover_many

logger = logging.getLogger(__name__)

Request = tuple[str, int | None, str | None]


class StreamReader:
    def __init__(self) -> None:
        self._waiting: dict[Request, list[asyncio.Future[Recovery]]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def recover(self, stream: str, since: int | None = None, epoch: str | None = None) -> Recovery:
        """The stream's position, and with `since` what a socket that saw it missed."""
        future: asyncio.Future[Recovery] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((stream, since, epoch), []).append(future)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="stream-reader")
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            metrics.stream_reads.inc()
            try:
                answers = await database_sync_to_async(recover_many)(list(batch))
            except Exception as exc:
                logger.warning("reading %d stream positions failed: %s", len(batch), exc)
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for request, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result(answers[request])
