"""The broker cancelling an instance's consumer, and reading back what that cost.

RabbitMQ cancels a consumer whose queue is deleted: by an operator, or with the cluster node that
held it while this instance's connection stayed on another node. aio-pika then declares the
queue again, binds it and consumes, all on the same connection, so no reconnect callback runs;
but what was routed while the queue was missing went nowhere, and a stream that gets no later
message would never show the gap. So once the consumer is back, the streams are read back from
the database, as after a reconnection.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustChannel

logger = logging.getLogger(__name__)

# How often a cancelled consumer is looked for while aio-pika restores it.
RESTORE_POLL_SECONDS = 0.1


class ConsumerCancelWatch:
    """Calls `on_restored` each time the broker cancelled `tag` and the consumer is back."""

    def __init__(
        self,
        channel: AbstractRobustChannel,
        on_restored: Callable[[], Awaitable[None]],
        stopping: asyncio.Event,
    ) -> None:
        self.channel = channel
        self.on_restored = on_restored
        self.stopping = stopping
        self.tag: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def watch(self, tag: str) -> None:
        self.tag = tag
        await self._hook()
        # A reopened channel is a new aiormq channel: hook that one too.
        self.channel.reopen_callbacks.add(self._on_reopen)

    def _on_reopen(self, *args: Any) -> None:
        asyncio.get_running_loop().create_task(self._hook(), name="consumer-cancel-hook")

    async def _hook(self) -> None:
        try:
            underlay = await self.channel.get_underlay_channel()
        except aiormq.exceptions.AMQPError as exc:
            logger.debug("no channel to watch for consumer cancels yet: %s", exc)
            return
        underlay.on_consumer_cancel_callbacks.add(self._on_cancel)

    def _on_cancel(self, frame: Any) -> None:
        if frame.consumer_tag != self.tag or self.stopping.is_set():
            return
        logger.warning("the broker cancelled this instance's consumer (its queue went away); restoring")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._after_restore(), name="consumer-restored"
            )

    async def _after_restore(self) -> None:
        while not self.stopping.is_set():
            if await self._consuming():
                logger.info("this instance consumes its queue again: reading back what it missed")
                await self.on_restored()
                return
            await asyncio.sleep(RESTORE_POLL_SECONDS)

    async def _consuming(self) -> bool:
        try:
            underlay = await self.channel.get_underlay_channel()
        except aiormq.exceptions.AMQPError:
            return False
        # aiormq's channel keeps its consumers by tag (not part of its abstract interface).
        return self.tag in getattr(underlay, "consumers", {})
