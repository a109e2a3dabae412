"""Graceful drain of a web instance on SIGTERM.

Stop taking sockets (`/readyz` turns 503 so the balancer looks elsewhere), close the open ones
with 1001 "going away" so clients reconnect to another instance, flush the delivery log, close
the broker connection, then stop Daphne; all within RT_DRAIN_SECONDS.
"""

import asyncio
import logging
import signal

from django.conf import settings

from consumers_app.bridge import get_bridge

logger = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
draining = False


def install_drain_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Replace Twisted's SIGTERM handler (which stops at once) with a drain, once the loop runs."""

    def install() -> None:
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(drain_and_stop()))

    loop.call_soon(install)


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

    reactor.stop()


async def drain() -> None:
    bridge = get_bridge()
    sockets = list(bridge.registry.sockets)
    logger.info(
        "draining: closing %d sockets with %d, flushing the delivery log", len(sockets), CLOSE_GOING_AWAY
    )
    for socket in sockets:
        socket.closing = True
        try:
            await socket.close(code=CLOSE_GOING_AWAY)
        except Exception:
            logger.debug("socket %s was already gone", socket.connection_id)
    # Let Daphne write the close frames before the log and connection go.
    await asyncio.sleep(0.2)
    await bridge.stop()
    logger.info("drained")
