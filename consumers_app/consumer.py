"""The WebSocket consumer (CONTRACT §4): thin; the bridge delivers, services decide."""

import asyncio
import logging
import uuid
from typing import Any

import orjson
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError, DataError
from django.utils import timezone

from consumers_app import lifecycle
from consumers_app.bridge import InstanceBridge, ensure_bridge
from consumers_app.handlers.base import InvalidPayload
from consumers_app.handlers.registry import get_handler
from consumers_app.ratelimit import TokenBucket
from consumers_app.transport import (
    close_with_code,
    daphne_protocol,
    spread_keepalive,
    text_frame,
    unsent_bytes,
    write_frame,
)
from notifications import metrics
from notifications.broker import BrokerUnavailable
from notifications.services import inbound as inbound_service
from notifications.services.payloads import NUL_RULE, has_nul
from notifications.services.topics import TOPIC_RULE, can_subscribe, is_valid_topic_name

logger = logging.getLogger(__name__)

# Close code for a reader too slow to keep up (its outbound queue filled): "try again later".
CLOSE_SLOW_READER = 1013
MAX_REF_LENGTH = 100


class FrameError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class RealtimeConsumer(AsyncWebsocketConsumer):
    bridge: InstanceBridge
    connection_id: str
    user_id: int

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Channels' consumer loop without its task and `asyncio.wait` per frame: this consumer
        reads the socket alone (the bridge, not a channel layer, brings it messages)."""
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch without its thread hop per frame to close old database connections:
        every database call here goes through database_sync_to_async, which does that itself."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or lifecycle.draining:
            await self.close()  # before accept: Daphne refuses the handshake with 403
            return
        self.user_id = user.pk
        self.username = user.get_username()
        self.connection_id = f"c-{uuid.uuid4().hex[:16]}"
        self.rate = TokenBucket(settings.RT_SOCKET_RATE)
        # Read once per socket, not per frame (settings are a lazy object).
        self.max_frame_bytes = settings.RT_MAX_FRAME_BYTES
        self.max_payload_bytes = settings.RT_MAX_PAYLOAD_BYTES
        self.closing = False
        self.bridge = ensure_bridge()
        await self.accept()
        # Under Daphne, frames go straight to its protocol (encoded once per message by the
        # bridge); elsewhere through ASGI `send`, from a bounded queue drained by a writer task.
        self.protocol = daphne_protocol(self.base_send)
        self.buffer_limit = settings.RT_SOCKET_MAX_BUFFER_BYTES
        self.outbox: asyncio.Queue[bytes] | None = None
        if self.protocol is not None:
            spread_keepalive(self.protocol)
        else:
            self.outbox = asyncio.Queue(maxsize=settings.RT_SOCKET_QUEUE)
            self.writer = asyncio.get_running_loop().create_task(self._write_loop())
        self.push(
            {
                "type": "welcome",
                "connection": self.connection_id,
                "instance": self.bridge.instance_id,
                "user": self.username,
            }
        )
        self.bridge.register(self)

    async def disconnect(self, code: int) -> None:
        if not hasattr(self, "connection_id"):
            return
        self.closing = True
        self.bridge.unregister(self)
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.cancel()

    # --- outbound ----------------------------------------------------------------------

    def deliver(self, frame: bytes, wire: bytes | None = None) -> bool:
        """Hand one encoded frame to this socket now (called by the bridge; never blocks).

        `wire` is the frame already framed for the WebSocket, shared by all sockets of a message.
        """
        if self.closing:
            return False
        protocol = self.protocol
        if protocol is not None:
            if not write_frame(protocol, wire or text_frame(frame)):
                return False
            if unsent_bytes(protocol) > self.buffer_limit:
                self.close_slow_reader(f"{unsent_bytes(protocol)} bytes unread")
            return True
        try:
            self.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            self.close_slow_reader(f"{self.outbox.qsize()} frames waiting")
            return False
        return True

    def push(self, frame: dict[str, Any]) -> None:
        self.deliver(orjson.dumps(frame))

    async def _write_loop(self) -> None:
        while True:
            frame = await self.outbox.get()
            await self.send(text_data=frame.decode())

    def close_slow_reader(self, why: str) -> None:
        """A client that does not read is closed, not buffered for: memory stays bounded."""
        if self.closing:
            return
        logger.warning("closing %s (user %s): slow reader, %s", self.connection_id, self.username, why)
        metrics.slow_readers_closed.inc()
        self.closing = True
        asyncio.get_running_loop().create_task(self.close_with(CLOSE_SLOW_READER, "too slow: reconnect"))

    async def close_with(self, code: int, reason: str) -> None:
        """Close with a standard code (Daphne alone would refuse 1001 and 1013)."""
        self.closing = True
        if self.protocol is not None:
            close_with_code(self.protocol, code, reason)
        else:
            await self.close(code=code, reason=reason)

    def error(self, code: str, detail: str, ref: Any = None) -> None:
        self.push({"type": "error", "code": code, "detail": detail, "ref": ref})

    # --- inbound -----------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            self.error("invalid", "frames must be JSON text, not binary")
            return
        ref = None
        try:
            frame = orjson.loads(text_data)
        except orjson.JSONDecodeError:
            frame = None
            if self.rate.allow():
                self.error("bad_json", "the frame is not valid JSON")
            else:
                self.error("rate_limited", f"more than {settings.RT_SOCKET_RATE:g} frames per second")
            return
        if isinstance(frame, dict):
            ref = frame.get("ref")
            if not isinstance(ref, (str, int)) or isinstance(ref, bool):
                ref = None
        try:
            if not self.rate.allow():
                raise FrameError("rate_limited", f"more than {settings.RT_SOCKET_RATE:g} frames per second")
            if len(text_data) > self.max_frame_bytes or (
                # UTF-8 takes at most 4 bytes a character: most frames need no encoding to tell.
                len(text_data) * 4 > self.max_frame_bytes and len(text_data.encode()) > self.max_frame_bytes
            ):
                raise FrameError("too_large", f"frames are limited to {self.max_frame_bytes} bytes")
            if not isinstance(frame, dict):
                raise FrameError("invalid", "a frame is a JSON object with a `type`")
            kind = frame.get("type")
            if not isinstance(kind, str):
                raise FrameError("invalid", "a frame needs a string `type`")
            handler = self.frame_handlers.get(kind)
            if handler is None:
                raise FrameError("unknown_type", f"unknown frame type {kind[:50]!r}")
            await handler(self, frame, ref)
        except FrameError as exc:
            self.error(exc.code, exc.detail, ref)

    async def on_ping(self, frame: dict[str, Any], ref: Any) -> None:
        self.push({"type": "pong"})

    async def on_subscribe(self, frame: dict[str, Any], ref: Any) -> None:
        topic = self._topic(frame)
        if not await database_sync_to_async(can_subscribe)(self.scope["user"], topic):
            raise FrameError("forbidden", f"you may not subscribe to {topic!r}")
        self.bridge.registry.subscribe(self, topic)
        self.push({"type": "subscribed", "topic": topic})

    async def on_unsubscribe(self, frame: dict[str, Any], ref: Any) -> None:
        topic = self._topic(frame)
        self.bridge.registry.unsubscribe(self, topic)
        self.push({"type": "unsubscribed", "topic": topic})

    async def on_ack(self, frame: dict[str, Any], ref: Any) -> None:
        try:
            message_id = uuid.UUID(str(frame.get("id")))
        except ValueError:
            raise FrameError("invalid", "ack needs the `id` of a message") from None
        self.bridge.log.record_ack(message_id, self.connection_id, timezone.now())

    async def on_send(self, frame: dict[str, Any], ref: Any) -> None:
        event = frame.get("event")
        if "ref" in frame and (ref is None or len(str(ref)) > MAX_REF_LENGTH):
            raise FrameError("invalid", f"`ref` must be a string of at most {MAX_REF_LENGTH} characters")
        if not isinstance(event, str) or not event:
            raise FrameError("invalid", "send needs a string `event`")
        handler = get_handler(event)
        if handler is None:
            raise FrameError("unknown_type", f"no handler for event {event[:50]!r}")
        payload = frame.get("payload")
        encoded = orjson.dumps(payload)
        if len(encoded) > self.max_payload_bytes:
            raise FrameError("too_large", f"payloads are limited to {self.max_payload_bytes} bytes")
        if has_nul(payload, encoded):
            raise FrameError("invalid", NUL_RULE)
        try:
            handler.validate(payload)
        except InvalidPayload as exc:
            raise FrameError("invalid", str(exc)) from None
        record = inbound_service.NewInbound(
            user_id=self.user_id,
            event=event,
            payload=payload,
            ref="" if ref is None else str(ref),
            connection=self.connection_id,
            instance=self.bridge.instance_id,
        )
        try:
            await self.bridge.inbound.submit(record)
        except DataError:
            raise FrameError("invalid", "the database cannot store this frame") from None
        except DatabaseError:
            raise FrameError(
                "unavailable", "the database is unavailable; nothing was queued, retry later"
            ) from None
        except BrokerUnavailable:
            raise FrameError(
                "unavailable", "the message broker is unavailable; nothing was queued, retry later"
            ) from None
        metrics.inbound_queued.inc()
        self.push({"type": "receipt", "ref": ref, "id": str(record.id)})

    def _topic(self, frame: dict[str, Any]) -> str:
        topic = frame.get("topic")
        if not is_valid_topic_name(topic):
            raise FrameError("invalid", f"`topic` must be {TOPIC_RULE}")
        return topic

    frame_handlers = {
        "ping": on_ping,
        "subscribe": on_subscribe,
        "unsubscribe": on_unsubscribe,
        "ack": on_ack,
        "send": on_send,
    }
