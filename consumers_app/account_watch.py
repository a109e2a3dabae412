"""Sockets of deactivated (or deleted) accounts are closed within RT_ACCOUNT_CHECK_SECONDS.

A socket authenticates once, at its handshake; an admin who deactivates a user expects the
user's open sockets to go too. Each instance asks the database, now and then, which of its
sockets' users are no longer active: one query per few thousand users, not one per socket.
"""

import asyncio
import logging
import random
from collections.abc import Iterable

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model

from consumers_app.registry import SocketRegistry

logger = logging.getLogger(__name__)

# Close code for a socket whose account is gone: "policy violation" (RFC 6455).
CLOSE_ACCOUNT_INACTIVE = 1008
# Users asked about in one query at most.
USERS_PER_QUERY = 5000


def inactive_user_ids(user_ids: Iterable[int]) -> set[int]:
    """Those of `user_ids` that are deactivated or no longer exist."""
    wanted = list(user_ids)
    active: set[int] = set()
    model = get_user_model()
    for start in range(0, len(wanted), USERS_PER_QUERY):
        chunk = wanted[start : start + USERS_PER_QUERY]
        active.update(model.objects.filter(pk__in=chunk, is_active=True).values_list("pk", flat=True))
    return set(wanted) - active


async def close_inactive_sockets(registry: SocketRegistry) -> int:
    """Close the sockets of users no longer active; return how many."""
    user_ids = list(registry.by_user)
    if not user_ids:
        return 0
    gone = await database_sync_to_async(inactive_user_ids)(user_ids)
    closed = 0
    for user_id in gone:
        for socket in list(registry.by_user.get(user_id, ())):
            logger.info("closing %s: its account %s is no longer active", socket.connection_id, user_id)
            # It leaves the registry when its connection ends; it takes no message meanwhile.
            await socket.close_with(CLOSE_ACCOUNT_INACTIVE, "account deactivated")
            closed += 1
    return closed


async def watch_accounts(registry: SocketRegistry, stop: asyncio.Event) -> None:
    """Check every RT_ACCOUNT_CHECK_SECONDS (jittered) until `stop`."""
    interval = settings.RT_ACCOUNT_CHECK_SECONDS
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval * random.uniform(0.8, 1.0))
            return
        except TimeoutError:
            pass
        try:
            await close_inactive_sockets(registry)
        except Exception:
            logger.warning("could not check for deactivated accounts; trying again later", exc_info=True)
