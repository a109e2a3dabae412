"""The server's half of one socket: frames to its client, bounded, and how it is closed.

Under Daphne frames go straight to its protocol (encoded once per message by the bridge, see
`transport`); elsewhere (WebsocketCommunicator in tests, another server) through ASGI `send`,
from a bounded queue drained by a writer task. Either way a client that stops reading is
closed, not buffered for, and delivery never blocks the bridge.
"""

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
from django.conf import settings

from consumers_app.transport import (
    close_with_code,
    daphne_protocol,
    spread_keepalive,
    text_frame,
    unsent_bytes,
    write_frame,
)
from notifications import metrics

logger = logging.getLogger(__name__)

# Close code for a reader too slow to keep up (its outbound queue filled): "try again later".
CLOSE_SLOW_READER = 1013

# While `corked`: the frames each socket is given, written when the block ends. Per thread, read
# when a frame is given: not a ContextVar, which callbacks and tasks created inside the block
# would carry with them and fill after the block had written, so their frames would never leave.
_corked = threading.local()


@contextlib.contextmanager
def corked() -> Iterator[None]:
    """Frames given to sockets inside the block are written when it ends, a socket's all at once.

    A broker message often holds several messages for one socket (a batch to a user, publishes
    grouped together): one system call per socket instead of one per frame, each of which costs
    the sender the whole loopback/network path and a wake-up of the reader. Use it around code
    that does not yield to the loop (a socket's frames stay in order; nothing else writes meanwhile).
    """
    if _pending() is not None:  # already inside a corked block: that one writes
        yield
        return
    pending: dict[Outbound, list[bytes]] = {}
    _corked.pending = pending
    try:
        yield
    finally:
        _corked.pending = None
        for outbound, frames in pending.items():
            try:
                outbound.write_now(frames[0] if len(frames) == 1 else b"".join(frames))
            except Exception:  # one broken socket must not keep the others' frames back
                logger.exception("writing to %s failed", outbound.label)


def _pending() -> "dict[Outbound, list[bytes]] | None":
    return getattr(_corked, "pending", None)


class Outbound:
    def __init__(
        self,
        base_send: Any,
        send_text: Callable[[str], Awaitable[None]],
        close_asgi: Callable[[int, str], Awaitable[None]],
        label: str,
    ) -> None:
        self.label = label  # for logs: the connection and its user
        self.closing = False
        self._send_text = send_text
        self._close_asgi = close_asgi
        self.protocol = daphne_protocol(base_send)
        self.buffer_limit: int = settings.RT_SOCKET_MAX_BUFFER_BYTES
        self.outbox: asyncio.Queue[bytes] | None = None
        self.writer: asyncio.Task[None] | None = None
        if self.protocol is not None:
            spread_keepalive(self.protocol)
        else:
            self.outbox = asyncio.Queue(maxsize=settings.RT_SOCKET_QUEUE)
            self.writer = asyncio.get_running_loop().create_task(self._write_loop())

    def deliver(self, frame: bytes, wire: bytes | None = None) -> bool:
        """Hand one encoded frame to the socket now (called by the bridge; never blocks).

        `wire` is the frame already framed for the WebSocket, shared by all sockets of a message.
        """
        if self.closing:
            return False
        protocol = self.protocol
        if protocol is not None:
            wire = wire or text_frame(frame)
            pending = _pending()
            if pending is not None:
                if protocol.state != protocol.STATE_OPEN:
                    return False
                pending.setdefault(self, []).append(wire)
                return True
            return self.write_now(wire)
        assert self.outbox is not None
        try:
            self.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            self.close_slow_reader(f"{self.outbox.qsize()} frames waiting")
            return False
        return True

    def write_now(self, wire: bytes) -> bool:
        """Write WebSocket frames to Daphne's socket; a client that is not reading them is closed."""
        assert self.protocol is not None
        if self.closing or not write_frame(self.protocol, wire):
            return False
        if unsent_bytes(self.protocol) > self.buffer_limit:
            self.close_slow_reader(f"{unsent_bytes(self.protocol)} bytes unread")
        return True

    def push(self, frame: dict[str, Any]) -> None:
        self.deliver(orjson.dumps(frame))

    async def _write_loop(self) -> None:
        assert self.outbox is not None
        while True:
            frame = await self.outbox.get()
            await self._send_text(frame.decode())

    def close_slow_reader(self, why: str) -> None:
        """A client that does not read is closed, not buffered for: memory stays bounded."""
        if self.closing:
            return
        logger.warning("closing %s: slow reader, %s", self.label, why)
        metrics.slow_readers_closed.inc()
        self.closing = True
        asyncio.get_running_loop().create_task(self.close_with(CLOSE_SLOW_READER, "too slow: reconnect"))

    async def close_with(self, code: int, reason: str) -> None:
        """Close with a standard code (Daphne alone would refuse 1001 and 1013)."""
        self.closing = True
        if self.protocol is not None:
            close_with_code(self.protocol, code, reason)
        else:
            await self._close_asgi(code, reason)

    def stop(self) -> None:
        """The connection is gone: deliver nothing more."""
        self.closing = True
        if self.writer is not None:
            self.writer.cancel()
