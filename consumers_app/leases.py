"""A process's lease: renewed every RENEW_SECONDS while it lives, so the others (and the admin's
overview) know it is up; one that stops renewing is dead after TTL_SECONDS."""

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async
from prometheus_client import REGISTRY

from notifications import metrics
from notifications.services import presence as service

logger = logging.getLogger(__name__)

TTL_SECONDS = 10.0
RENEW_SECONDS = 3.0


class LeaseRenewer:
    def __init__(self, instance_id: str, kind: str, stats: Callable[[], dict[str, Any]]) -> None:
        self.instance_id = instance_id
        self.kind = kind
        self.stats = stats

    async def renew(self) -> None:
        await database_sync_to_async(service.renew_lease)(
            self.instance_id, self.kind, TTL_SECONDS, self.stats()
        )
        metrics.lease_renewals.inc()

    async def run(self) -> None:
        """Renew until cancelled (a failed renewal is logged and tried again)."""
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                await self.renew()
            except Exception as exc:
                logger.warning("could not renew the lease of %s: %s", self.instance_id, exc)


def counter_value(name: str) -> float:
    """This process's value of one of its own `instance`-labelled counters (0 if none yet)."""
    value = REGISTRY.get_sample_value(f"{name}_total", {"instance": metrics.INSTANCE})
    return value or 0.0
