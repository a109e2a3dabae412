"""The WebSocket consumer (CONTRACT §4): checks each client frame and calls a service.

One short method per client frame type, which is most of its length.
What leaves toward the client is `outbound.Outbound`'s; what the instance shares between its
sockets (registry, delivery log, inbound queueing) is the bridge's, reached through its methods.
"""

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
from django.db import DatabaseError, InterfaceError, OperationalError
from django.utils import timezone

from consumers_app import lifecycle
from consumers_app.bridge import InstanceBridge, ensure_bridge
from consumers_app.frames import (
    MAX_REF_LENGTH,
    RESUMABLE,
    FrameError,
    exact_payload,
    ref_of,
    since_of,
)
from consumers_app.handlers.base import Forbidden, InvalidPayload
from consumers_app.handlers.registry import get_handler
from consumers_app.outbound import Outbound
from consumers_app.ratelimit import TokenBucket
from notifications import metrics
from notifications.broker import BrokerUnavailable
from notifications.services import inbound as inbound_service
from notifications.services.payloads import PayloadRejected, check_payload, may_hold_rounded_integers
from notifications.services.streams import Recovery
from notifications.services.topics import TOPIC_RULE, can_subscribe, is_valid_topic_name

logger = logging.getLogger(__name__)

# Seconds a new socket's own streams (its user's, the broadcasts) are held for a `resume`; a
# socket that sends anything else first, or nothing, gets them live then.
RESUME_WINDOW_SECONDS = 2.0
# A socket that comes while its instance is still starting (a browser reconnects as soon as the
# port answers, before /readyz does) waits for the broker connection, up to this long after the
# instance began connecting, so its first frames (resume, subscribe, send) are not refused as
# "unavailable". A broker that refused the first attempts delays no socket.
STARTING_WAIT_SECONDS = 3.0


class RealtimeConsumer(AsyncWebsocketConsumer):
    bridge: InstanceBridge
    connection_id: str
    user_id: int
    outbound: Outbound | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Channels' consumer loop without its task and `asyncio.wait` per frame: this consumer
        reads the socket alone (the bridge, not a channel layer, brings it messages).

        Whatever ends the loop, an exception included (Daphne then closes with 1011 and sends
        no `websocket.disconnect`), the socket leaves the registry: it is there only while open.
        """
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                # Channels' dispatch would also close old database connections in a thread per
                # frame; every database call here goes through database_sync_to_async, which
                # does that itself.
                message = await receive()
                handler = getattr(self, get_handler_name(message), None)
                if handler is None:
                    raise ValueError(f"no handler for message type {message['type']}")
                await handler(message)
        except StopConsumer:
            pass
        finally:
            self._forget()

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
        self.max_subscriptions = settings.RT_MAX_SUBSCRIPTIONS
        self.bridge = ensure_bridge()
        await self.bridge.wait_started(STARTING_WAIT_SECONDS)
        await self.accept()
        self.outbound = Outbound(
            self.base_send,
            lambda text: self.send(text_data=text),
            lambda code, reason: self.close(code=code, reason=reason),
            label=f"{self.connection_id} (user {self.username})",
        )
        # The bridge calls these for every message: bound once, no extra call per delivery.
        self.deliver = self.outbound.deliver
        self.close_with = self.outbound.close_with
        self.push = self.outbound.push
        self.holding = True
        self.release_timer = asyncio.get_running_loop().call_later(RESUME_WINDOW_SECONDS, self._release_holds)
        await self.bridge.register(self)
        self.push(
            {
                "type": "welcome",
                "connection": self.connection_id,
                "instance": self.bridge.instance_id,
                "user": self.username,
            }
        )

    def _release_holds(self) -> None:
        """The socket will not resume (the window passed, or it sent something else first)."""
        if self.holding:
            self.holding = False
            self.release_timer.cancel()
            self.bridge.release_holds(self)

    async def disconnect(self, code: int) -> None:
        self._forget()

    def _forget(self) -> None:
        if self.outbound is None:
            return
        self.release_timer.cancel()
        self.outbound.stop()
        self.bridge.unregister(self)

    def error(self, code: str, detail: str, ref: Any = None) -> None:
        self.push({"type": "error", "code": code, "detail": detail, "ref": ref})

    # --- inbound -----------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            # Binary frames count against the rate like any other.
            if self.rate.allow():
                self.error("invalid", "frames must be JSON text, not binary")
            else:
                self._rate_limited(None)
            return
        try:
            frame = orjson.loads(text_data)
        except orjson.JSONDecodeError:
            if self.rate.allow():
                self.error("bad_json", "the frame is not valid JSON")
            else:
                self._rate_limited(None)
            return
        ref = ref_of(frame)
        self.frame_text = text_data
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
            if "ref" in frame and ref is None:
                raise FrameError("invalid", f"`ref` must be a string of at most {MAX_REF_LENGTH} characters")
            kind = frame.get("type")
            if not isinstance(kind, str):
                raise FrameError("invalid", "a frame needs a string `type`")
            handler = self.frame_handlers.get(kind)
            if handler is None:
                raise FrameError("unknown_type", f"unknown frame type {kind[:50]!r}")
            if self.holding and kind != "resume" and not (kind == "subscribe" and "since" in frame):
                self._release_holds()
            await handler(self, frame, ref)
        except FrameError as exc:
            self.error(exc.code, exc.detail, ref)
        except (OperationalError, InterfaceError):
            logger.warning("database unavailable for a frame of %s", self.connection_id, exc_info=True)
            self.error("unavailable", "the database is unavailable; retry later", ref)
        except Exception:
            # A bug, not the client's fault: logged, answered, and this socket stays open.
            logger.exception("frame of %s (user %s) failed", self.connection_id, self.username)
            self.error("invalid", "the server could not handle this frame", ref)

    def _rate_limited(self, ref: Any) -> None:
        self.error("rate_limited", f"more than {settings.RT_SOCKET_RATE:g} frames per second", ref)

    async def on_ping(self, frame: dict[str, Any], ref: Any) -> None:
        self.push({"type": "pong"})

    async def on_subscribe(self, frame: dict[str, Any], ref: Any) -> None:
        topic = self._topic(frame)
        since = since_of(frame) if "since" in frame else None
        watch_presence = frame.get("presence", False)
        if not isinstance(watch_presence, bool):
            raise FrameError("invalid", "`presence` must be true or false")
        topics = self.bridge.topics_of(self)
        if topic not in topics and len(topics) >= self.max_subscriptions:
            raise FrameError("too_many", f"a socket may subscribe to at most {self.max_subscriptions} topics")
        if not await database_sync_to_async(can_subscribe)(self.scope["user"], topic):
            raise FrameError("forbidden", f"you may not subscribe to {topic!r}")

        def answer(position: Recovery) -> None:
            subscribed = {"type": "subscribed", "topic": topic, "seq": position.seq, "epoch": position.epoch}
            if since is not None:
                subscribed["recovered"] = position.recovered
            self.push(subscribed)

        try:
            await self.bridge.subscribe(self, topic, since, answer, watch_presence=watch_presence)
        except BaseException:
            self.bridge.unsubscribe(self, topic)
            raise

    async def on_presence(self, frame: dict[str, Any], ref: Any) -> None:
        topic = self._topic(frame)
        if not await database_sync_to_async(can_subscribe)(self.scope["user"], topic):
            raise FrameError("forbidden", f"you may not see who is on {topic!r}")
        members = await self.bridge.presence_of(topic)
        users = [{"user": user, "connections": connections} for user, connections in members]
        self.push({"type": "presence", "ref": ref, "topic": topic, "users": users})

    async def on_resume(self, frame: dict[str, Any], ref: Any) -> None:
        stream = frame.get("stream")
        if stream not in RESUMABLE:
            raise FrameError("invalid", "resume needs `stream`: `user` or `broadcast`")
        since = since_of(frame)

        def answer(position: Recovery) -> None:
            self.push(
                {
                    "type": "resumed",
                    "stream": stream,
                    "seq": position.seq,
                    "epoch": position.epoch,
                    "recovered": position.recovered,
                }
            )

        await self.bridge.resume(self, stream, since, answer)

    async def on_unsubscribe(self, frame: dict[str, Any], ref: Any) -> None:
        topic = self._topic(frame)
        self.bridge.unsubscribe(self, topic)
        self.push({"type": "unsubscribed", "topic": topic})

    async def on_ack(self, frame: dict[str, Any], ref: Any) -> None:
        try:
            message_id = uuid.UUID(str(frame.get("id")))
        except ValueError:
            raise FrameError("invalid", "ack needs the `id` of a message") from None
        self.bridge.record_ack(message_id, self.connection_id, timezone.now())

    async def on_send(self, frame: dict[str, Any], ref: Any) -> None:
        event = frame.get("event")
        if not isinstance(event, str) or not event:
            raise FrameError("invalid", "send needs a string `event`")
        handler = get_handler(event)
        if handler is None:
            raise FrameError("unknown_type", f"no handler for event {event[:50]!r}")
        payload = frame.get("payload")
        try:
            encoded = check_payload(payload)
            if may_hold_rounded_integers(encoded):
                # orjson reads an integer past 64 bits as a float; the API (Python's parser)
                # refuses it, and so must the socket rather than take a different number.
                check_payload(exact_payload(self.frame_text))
            handler.validate(payload)
            if handler.authorizes:
                await database_sync_to_async(handler.authorize)(self.scope["user"], payload)
        except PayloadRejected as exc:
            raise FrameError(exc.code, exc.detail) from None
        except InvalidPayload as exc:
            raise FrameError("invalid", str(exc)) from None
        except Forbidden as exc:
            raise FrameError("forbidden", str(exc)) from None
        record = inbound_service.NewInbound(
            user_id=self.user_id,
            event=event,
            payload=payload,
            ref="" if ref is None else str(ref),
            connection=self.connection_id,
            instance=self.bridge.instance_id,
        )
        try:
            await self.bridge.submit_inbound(record)
        except (OperationalError, InterfaceError):
            raise FrameError(
                "unavailable", "the database is unavailable; nothing was queued, retry later"
            ) from None
        except DatabaseError:  # it answered, and refused this one row
            raise FrameError("invalid", "the database cannot store this frame") from None
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
        "resume": on_resume,
        "presence": on_presence,
    }
