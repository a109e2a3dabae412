"""Graceful drain of a web instance on SIGTERM.

Stop taking sockets (`/readyz` turns 503 so the balancer looks elsewhere), close the open ones
with 1001 "going away" so clients reconnect to another instance, flush the delivery log, close
the broker connection, then stop Daphne; all within RT_DRAIN_SECONDS.
"""

import asyncio
import logging
import os
import threading

from django.conf import settings

from consumers_app.bridge import get_bridge

logger = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
# How long the drain waits for clients to complete the close handshake.
CLOSE_HANDSHAKE_SECONDS = 3.0
draining = False


def install_drain_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Make Twisted's SIGTERM handler drain first (by default it stops the reactor at once).

    Twisted installs `reactor.sigTerm` as the handler when the reactor starts, so replacing that
    attribute before `daphne` runs the reactor puts the drain in its place.
    """
    from twisted.internet import reactor

    def on_sigterm(*args: object) -> None:
        loop.call_soon_threadsafe(lambda: loop.create_task(drain_and_stop()))

    reactor.sigTerm = on_sigterm


async def drain_and_stop() -> None:
    global draining
    if draining:
        return
    draining = True
    try:
        await asyncio.wait_for(drain(), timeout=settings.RT_DRAIN_SECONDS)
    except TimeoutError:
        logger.warning("drain did not finish within %.0fs; stopping anyway", settings.RT_DRAIN_SECONDS)
    except Exception:
        logger.exception("drain failed; stopping anyway")
    from twisted.internet import reactor

    # A request thread still blocked on the stopped loop would keep the process alive: the
    # drain's bound holds whatever happens after this point.
    deadline = threading.Timer(settings.RT_DRAIN_SECONDS, os._exit, args=(0,))
    deadline.daemon = True
    deadline.start()
    reactor.stop()  # type: ignore[misc]  # Twisted's zope interfaces need the mypy-zope plugin


async def drain() -> None:
    bridge = get_bridge()
    sockets = list(bridge.registry.sockets)
    logger.info(
        "draining: closing %d sockets with %d, flushing the delivery log", len(sockets), CLOSE_GOING_AWAY
    )
    for socket in sockets:
        try:
            await socket.close_with(CLOSE_GOING_AWAY, "server draining: reconnect")
        except Exception:
            logger.warning("closing %s failed", socket.connection_id, exc_info=True)
    # Wait for the clients to answer the close (their disconnects empty the registry), so each
    # sees a clean 1001 rather than a dropped connection; a client that does not answer is cut.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_HANDSHAKE_SECONDS
    while bridge.registry.sockets and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await bridge.stop()
    logger.info("drained")
