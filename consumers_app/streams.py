"""Ordered delivery of each stream in a web instance, and sockets catching up with a stream.

(Ordering, gap filling and catching up share one per-stream state, hence one module.)

Messages can reach an instance out of seq order (several publishers, several connections, a
sweeper) or not at all (a queue lost with its node). For each stream that has sockets here the
instance keeps the next seq it expects: an earlier one is a copy and is dropped, a later one
waits GAP_WAIT_SECONDS for the gap to close, then the gap is read from the database. So every
socket gets each stream in order, once, without holes.

A socket that joins a stream (subscribe, its user and the broadcast stream at connect) first
catches up: live messages are held for it while the database says where the stream stands
(and, with `since`, what it missed); then the answer, the missed messages and the held ones go
out in that order, and the socket turns live. Nothing is lost or doubled at the seam: a held
message the database read already covered is skipped by its seq.
"""

import asyncio
import datetime
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.utils import timezone

from consumers_app.registry import Socket, SocketRegistry
from consumers_app.stream_reader import StreamReader
from consumers_app.transport import text_frame
from notifications import jsonutil, metrics
from notifications.backoff import Backoff
from notifications.delivery_log import DeliveryLogWriter
from notifications.services.streams import Recovery, between, wire_name

logger = logging.getLogger(__name__)

# How long a message waits for an earlier seq before the gap is read from the database. Two
# publishers' messages cross within milliseconds; a lost one never comes.
GAP_WAIT_SECONDS = 0.2
# Early messages held per stream at most; past this the gap is given up (skipped) and logged.
MAX_EARLY = 10_000
# Longest wait between two reads of a stream's position while the database is down.
LOAD_BACKOFF_MAX = 5.0
# A gap fill or resync whose read failed (the database is down) is tried again after this long:
# no later message may come to show the gap again.
FILL_RETRY_SECONDS = 2.0

# A message ready for sockets: (seq, message id, JSON frame, ready-made WebSocket frame).
Frame = tuple[int | None, uuid.UUID, bytes, bytes]


@dataclass(slots=True)
class Catchup:
    """A socket joining a stream: live frames held for it until it has what came before them."""

    frames: list[Frame] = field(default_factory=list)
    floor: int = -1  # seqs up to here the socket has already (from the database)
    ready: bool = False  # the database answered: frames past `floor` may go out
    held: bool = False  # a new socket's own stream, waiting to learn whether it will resume


@dataclass(slots=True)
class StreamState:
    name: str
    epoch: str | None = None
    next_seq: int | None = None  # None until the stream's position is known
    early: dict[int, dict[str, Any]] = field(default_factory=dict)
    catchups: dict[Socket, Catchup] = field(default_factory=dict)
    gap_timer: asyncio.TimerHandle | None = None
    filling: bool = False  # a read of the stream (gap fill or resync) is in flight
    refill: bool = False  # a resync came while it was: the stream is read to its end after it
    loaded: asyncio.Event = field(default_factory=asyncio.Event)


class StreamTracker:
    def __init__(self, registry: SocketRegistry, log: DeliveryLogWriter) -> None:
        self.registry = registry
        self.log = log
        self.reader = StreamReader()
        self.states: dict[str, StreamState] = {}
        self.delivered = 0  # message frames written to sockets, for the instance's lease

    # --- messages from the broker --------------------------------------------------------

    def arrive(self, body: dict[str, Any], at: datetime.datetime | None = None) -> None:
        """A numbered message taken from the broker: deliver it in its stream's order. `at` is
        the delivery log's time (the messages of one broker message share it; default now)."""
        state = self.states.get(body["stream"])
        if state is None:
            return  # no socket of this instance is on that stream
        seq = body["seq"]
        if not isinstance(seq, int):
            raise ValueError(f"`seq` is not an integer: {seq!r}")
        if state.next_seq is None:
            state.early[seq] = body  # the position is being read
            return
        if body.get("epoch") != state.epoch:
            logger.warning(
                "stream %s renumbered (epoch %s -> %s)", state.name, state.epoch, body.get("epoch")
            )
            state.epoch, state.next_seq = body.get("epoch"), seq
            state.early.clear()
        if seq < state.next_seq:
            metrics.messages_duplicate.inc()
            return
        if seq > state.next_seq:
            state.early[seq] = body
            self._expect_gap(state)
            return
        self._emit(state, body, at)
        self._drain(state, at)

    def _drain(self, state: StreamState, at: datetime.datetime | None = None) -> None:
        """Deliver the early messages that are next in order now."""
        while state.next_seq in state.early:
            self._emit(state, state.early.pop(state.next_seq), at)
        if not state.early and state.gap_timer is not None:
            state.gap_timer.cancel()
            state.gap_timer = None

    def _emit(self, state: StreamState, body: dict[str, Any], at: datetime.datetime | None = None) -> None:
        """Deliver one message to the stream's live sockets and hold it for those catching up."""
        seq = body.get("seq")
        if isinstance(seq, int) and state.next_seq is not None and seq >= state.next_seq:
            state.next_seq = seq + 1
            # Its copy may be waiting among the early ones (it came from the broker while a read
            # of the database delivered it): left there, below `next_seq`, nothing would ever
            # drain it, and every later gap fill would read only up to it.
            state.early.pop(seq, None)
        targets = self.registry.targets(state.name)
        if not targets and not state.catchups:
            return
        frame = message_frame(body)
        wire = text_frame(frame)
        delivered = self._deliver(targets, frame, wire)
        if state.catchups:
            promoted: list[Socket] = []
            for socket, catchup in state.catchups.items():
                if not catchup.ready:
                    catchup.frames.append((seq, message_id(body), frame, wire))
                elif seq is None or seq > catchup.floor:
                    delivered += self._deliver([socket], frame, wire)
                    promoted.append(socket)
            for socket in promoted:
                del state.catchups[socket]
                self.registry.go_live(socket, state.name)
        self._record(body, delivered, at)

    def emit_unnumbered(self, stream: str, body: dict[str, Any]) -> None:
        """A message without a seq (published by something older): delivered as it comes."""
        state = self.states.get(stream)
        if state is not None:
            self._emit(state, body)

    def _deliver(self, sockets: list[Socket], frame: bytes, wire: bytes) -> list[Socket]:
        delivered: list[Socket] = []
        for socket in sockets:
            try:
                ok = socket.deliver(frame, wire)
            except Exception:
                logger.exception("delivery to %s failed", getattr(socket, "connection_id", "?"))
                ok = False
            if ok:
                delivered.append(socket)
            else:
                metrics.delivery_failures.inc()
        return delivered

    def _record(self, body: dict[str, Any], delivered: list[Socket], at: datetime.datetime | None) -> None:
        if delivered:
            self.log.record_deliveries(message_id(body), at or timezone.now(), delivered)
            metrics.deliveries.inc(len(delivered))
            self.delivered += len(delivered)

    # --- gaps ------------------------------------------------------------------------------

    def _expect_gap(self, state: StreamState) -> None:
        if len(state.early) > MAX_EARLY:
            # Bounded memory: the furthest ones go (the gap fill reads them back if they are real).
            for seq in sorted(state.early)[MAX_EARLY:]:
                del state.early[seq]
            logger.warning(
                "stream %s: more than %d messages waiting for a gap; the latest dropped",
                state.name,
                MAX_EARLY,
            )
        if state.gap_timer is None and not state.filling:
            loop = asyncio.get_running_loop()
            state.gap_timer = loop.call_later(
                GAP_WAIT_SECONDS, lambda: loop.create_task(self._fill_gap(state), name=f"gap-{state.name}")
            )

    async def _fill_gap(self, state: StreamState) -> None:
        state.gap_timer = None
        await self._read_on(state)

    async def _read_on(self, state: StreamState) -> None:
        """The read the stream needs now, if any: to its end if a resync asked for it (`refill`),
        else up to its first waiting message. None while another read is in flight: that one
        reads on after itself."""
        if self.states.get(state.name) is not state or state.next_seq is None or state.filling:
            return
        if state.refill:
            state.refill = False
            await self._fill(state, before=None)
        elif state.early:
            await self._fill(state, before=min(state.early))

    async def resync(self) -> None:
        """Deliver what the database has and this instance has not seen, on every stream here.

        After the broker connection came back, possibly to another node of a cluster whose
        copy of this instance's queue lost messages: no later message may come to show the gap.
        """
        loaded = []
        for state in self.states.values():
            if state.next_seq is None:
                continue  # its position is being read: nothing was delivered from it yet
            if state.filling:
                state.refill = True  # a gap fill reads only up to its gap: read on after it
            else:
                loaded.append(state)
        await asyncio.gather(*(self._fill(state, before=None) for state in loaded))

    async def _fill(self, state: StreamState, before: int | None) -> None:
        """Read the stream's messages after the last one delivered here (up to `before`) from
        the database and deliver them in order."""
        assert state.next_seq is not None
        after = state.next_seq - 1
        # Those waiting now were published before the read starts, hence committed before it.
        waiting = set(state.early)
        state.filling = True
        try:
            epoch, last, bodies = await database_sync_to_async(between)(state.name, after, before)
        except Exception as exc:
            logger.warning(
                "could not read %s after seq %d (%s); trying again in %.0f s",
                state.name,
                after,
                exc,
                FILL_RETRY_SECONDS,
            )
            self._retry_fill(state, to_end=before is None)
            return
        finally:
            state.filling = False
        if self.states.get(state.name) is not state or state.next_seq is None:
            return
        if epoch == state.epoch:
            # A message that came before the read and is past the stream's last seq was never
            # numbered by this deployment (every message is published after its commit): a
            # forgery, dropped rather than skipped to. One that came during the read may have
            # been committed after it read `last`: it waits, as any early message does.
            forged = [seq for seq in waiting if seq > last and seq in state.early]
            for seq in forged:
                del state.early[seq]
            if forged:
                metrics.messages_malformed.inc(len(forged))
                logger.error(
                    "stream %s: dropped %d messages numbered past its last seq %d",
                    state.name,
                    len(forged),
                    last,
                )
        if bodies:
            metrics.stream_gaps_filled.inc(len(bodies))
            logger.info(
                "stream %s: %d messages read from the database after seq %d", state.name, len(bodies), after
            )
        for body in bodies:
            if body["seq"] == state.next_seq and epoch == state.epoch:
                self._emit(state, body)
        # A seq the read covered (up to `last`) and did not find is not kept: skipped. Past
        # `last`, the early ones came during the read: the gap before them is read next.
        if (
            state.early
            and min(state.early) > state.next_seq
            and (state.next_seq <= last or epoch != state.epoch)
        ):
            self._skip_gap(state, "not kept in the database")
        self._drain(state)
        if state.refill:
            await self._read_on(state)
        elif state.early:
            self._expect_gap(state)

    def _retry_fill(self, state: StreamState, to_end: bool) -> None:
        """Read the stream again later: to its end (a failed resync), or up to its gap if one is
        still open then."""
        if to_end:
            state.refill = True
        loop = asyncio.get_running_loop()
        loop.call_later(
            FILL_RETRY_SECONDS, lambda: loop.create_task(self._read_on(state), name=f"refill-{state.name}")
        )

    def _skip_gap(self, state: StreamState, why: str) -> None:
        first = min(state.early)
        logger.warning("stream %s: seq %s..%d skipped (%s)", state.name, state.next_seq, first - 1, why)
        state.next_seq = first
        self._drain(state)

    # --- sockets joining and leaving streams ----------------------------------------------

    def _state(self, stream: str) -> StreamState:
        state = self.states.get(stream)
        if state is None:
            state = self.states[stream] = StreamState(stream)
            asyncio.get_running_loop().create_task(self._load(state), name=f"load-{stream}")
        return state

    async def _load(self, state: StreamState) -> None:
        """Read where the stream stands, until it works or no socket here wants it any more."""
        backoff = Backoff(LOAD_BACKOFF_MAX)
        while self.states.get(state.name) is state and state.next_seq is None:
            try:
                self._position_known(state, await self.reader.recover(state.name))
            except Exception as exc:
                logger.warning("cannot read the position of stream %s (%s); retrying", state.name, exc)
                await backoff.wait()

    async def loaded(self, stream: str, timeout: float) -> bool:
        """Wait until the stream's position is known here; False if it is not within `timeout`."""
        state = self._state(stream)
        try:
            await asyncio.wait_for(state.loaded.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _position_known(self, state: StreamState, position: Recovery) -> None:
        if state.next_seq is not None or self.states.get(state.name) is not state:
            return
        state.epoch, state.next_seq = position.epoch, position.seq + 1
        state.loaded.set()
        for seq in [seq for seq in state.early if seq < state.next_seq]:
            del state.early[seq]
        if state.early:
            self._drain(state)
            if state.early:
                self._expect_gap(state)

    def hold(self, socket: Socket, stream: str) -> None:
        """Hold a new socket's live messages of `stream` until it resumes it or `release`."""
        self._state(stream).catchups[socket] = Catchup(held=True)

    def release(self, socket: Socket, stream: str) -> None:
        """A held socket that did not resume: what was held goes out, and it turns live."""
        state = self.states.get(stream)
        catchup = state.catchups.get(socket) if state is not None else None
        if state is None or catchup is None or not catchup.held:
            return
        del state.catchups[socket]
        self._record_frames(socket, catchup.frames)
        self.registry.go_live(socket, stream)

    async def join(
        self,
        socket: Socket,
        stream: str,
        since: tuple[int, str] | None,
        answer: Callable[[Recovery], None],
    ) -> Recovery | None:
        """Put the socket on `stream`: answer, then (with `since`) what it missed, then the live ones.

        Without `since`, a stream already known here needs no database read. Returns the
        answer given, or None if the socket closed meanwhile.
        """
        state = self._state(stream)
        if since is None and state.next_seq is not None and socket not in state.catchups:
            assert state.epoch is not None
            position = Recovery(stream, state.next_seq - 1, state.epoch, recovered=False)
            answer(position)
            self.registry.go_live(socket, stream)
            return position
        self.registry.stop_live(socket, stream)
        catchup = state.catchups.get(socket)
        if catchup is None or not catchup.held:
            catchup = state.catchups[socket] = Catchup()
        catchup.held = False
        try:
            recovery = await self.reader.recover(stream, *(since or (None, None)))
        except BaseException:
            # Nothing stays held: the socket goes on live, without recovery (a topic's
            # subscriber is then unsubscribed by its caller).
            if state.catchups.get(socket) is catchup:
                del state.catchups[socket]
                self._record_frames(socket, catchup.frames)
                self.registry.go_live(socket, stream)
            raise
        if self.states.get(stream) is not state or state.catchups.get(socket) is not catchup:
            return None  # the socket left the stream (or closed) meanwhile
        if socket not in self.registry.sockets:
            return None
        self._position_known(state, recovery)
        answer(recovery)
        delivered: list[Frame] = []
        if recovery.recovered:
            for body in recovery.messages:
                frame = message_frame(body)
                delivered.append((body["seq"], message_id(body), frame, text_frame(frame)))
        catchup.floor, catchup.ready = recovery.seq, True
        delivered += [held for held in catchup.frames if held[0] is None or held[0] > catchup.floor]
        catchup.frames = []
        self._record_frames(socket, delivered)
        if state.next_seq is not None and state.next_seq - 1 >= catchup.floor:
            del state.catchups[socket]
            self.registry.go_live(socket, stream)
        return recovery

    def leave(self, socket: Socket, stream: str) -> None:
        self.registry.stop_live(socket, stream)
        state = self.states.get(stream)
        if state is None:
            return
        state.catchups.pop(socket, None)
        if not state.catchups and not self.registry.targets(stream):
            if state.gap_timer is not None:
                state.gap_timer.cancel()
            del self.states[stream]

    def _record_frames(self, socket: Socket, frames: list[Frame]) -> None:
        """Deliver frames (recovered or held) to one socket, recording each delivery."""
        now = timezone.now()
        for _, id_, frame, wire in frames:
            if socket.deliver(frame, wire):
                self.log.record_deliveries(id_, now, [socket])
                metrics.deliveries.inc()
                self.delivered += 1


def message_frame(body: dict[str, Any]) -> bytes:
    """The client's `message` frame (CONTRACT §4), encoded once for every socket it goes to."""
    return jsonutil.dumps(
        {
            "type": "message",
            "id": body["id"],
            "stream": wire_name(body["stream"]) if body.get("stream") else None,
            "seq": body.get("seq"),
            "epoch": body.get("epoch"),
            "topic": body.get("topic"),
            "event": body.get("event"),
            "payload": body.get("payload"),
            "published_at": body.get("published_at"),
        }
    )


def message_id(body: dict[str, Any]) -> uuid.UUID:
    """The message's id as a UUID (parsed once, when the bridge first reads the body)."""
    parsed = body.get("_uuid")
    if parsed is None:
        parsed = body["_uuid"] = uuid.UUID(str(body["id"]))
    return parsed
