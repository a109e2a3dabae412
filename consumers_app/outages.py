"""Waiting out a database or broker that is down, for the inbound worker.

A frame is never at fault for an outage, so no attempt of it is spent: the worker keeps its
frames unacked and tries the same step again, with backoff, until it works or the worker stops.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.db import InterfaceError, OperationalError, close_old_connections

from notifications.backoff import Backoff
from notifications.broker import BrokerUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors of the database itself: the frame is not at fault, so no attempt is spent on it.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError)
# Longest wait between two tries while the database or broker is down.
OUTAGE_BACKOFF_MAX = 30.0


class OutageWaiter:
    """Runs database work in the worker's threads and publishes, each until it succeeds.

    Raises `notifications.backoff.Stopped` when the worker stops meanwhile.
    """

    def __init__(self, queue_name: str, executor: ThreadPoolExecutor, stopping: asyncio.Event) -> None:
        self.queue_name = queue_name
        self.executor = executor
        self.stopping = stopping

    async def in_thread(self, function: Callable[[], T]) -> T:
        def run() -> T:
            close_old_connections()
            try:
                return function()
            finally:
                close_old_connections()

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    async def until_database_recovers(self, what: str, frames: str, function: Callable[[], T]) -> T:
        backoff = Backoff(OUTAGE_BACKOFF_MAX)
        while True:
            try:
                return await self.in_thread(function)
            except INFRASTRUCTURE_ERRORS as exc:
                logger.warning(
                    "%s: database error during %s of inbound %s (%s); retrying",
                    self.queue_name,
                    what,
                    frames,
                    exc,
                )
            await backoff.wait(self.stopping)

    async def until_broker_recovers(self, frames: str, publish: Callable[[], Awaitable[Any]]) -> None:
        backoff = Backoff(OUTAGE_BACKOFF_MAX)
        while True:
            try:
                await publish()
                return
            except BrokerUnavailable as exc:
                logger.warning(
                    "%s: cannot publish for inbound %s (%s); retrying", self.queue_name, frames, exc
                )
            await backoff.wait(self.stopping)
