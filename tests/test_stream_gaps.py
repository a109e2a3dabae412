"""consumers_app/streams.py against a real database: gaps read back, races with those reads.

A web instance reads a stream back from the database to fill a gap (a message lost with a queue
or a node, or nacked) and after every reconnection (`resync`). Messages keep arriving from the
broker while a read is in flight; these tests put them exactly there, deterministically, from
inside the read (the database thread), and check that every message reaches the socket once,
in order, with no later message needed to show it.
"""

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import transaction

from consumers_app import streams as streams_module
from consumers_app.registry import SocketRegistry
from consumers_app.streams import StreamState, StreamTracker
from notifications.services.messages import broker_body, create_message
from tests.support.stream_sockets import FakeSocket, NoLog
from tests.support.waiting import eventually

WITHIN = 10.0  # seconds for a gap fill (0.2 s wait, then a read) on two busy cores


@dataclass
class Tracked:
    tracker: StreamTracker
    socket: FakeSocket
    topic: str

    @property
    def stream(self) -> str:
        return f"topic:{self.topic}"

    @property
    def state(self) -> StreamState:
        return self.tracker.states[self.stream]

    def publish_sync(self, count: int = 1) -> list[dict[str, Any]]:
        """Store `count` numbered messages of the topic, each committed on its own (as the API
        does), and return their broker bodies; nothing reaches the tracker by itself."""
        bodies = []
        for _ in range(count):
            with transaction.atomic():
                message = create_message(topic=self.topic, event="tick", payload={})
            bodies.append(broker_body(message))
        return bodies

    async def publish(self, count: int = 1) -> list[dict[str, Any]]:
        return await database_sync_to_async(self.publish_sync)(count)

    async def got(self, seqs: list[int]) -> None:
        async def check() -> bool:
            return self.socket.seqs() == seqs

        try:
            await eventually(check, WITHIN, f"seqs {seqs}", interval=0.02)
        except TimeoutError:
            raise AssertionError(
                f"the socket got {self.socket.seqs()}, not {seqs}; next seq {self.state.next_seq}, "
                f"early {sorted(self.state.early)}"
            ) from None


@pytest.fixture
async def tracked(transactional_db):
    """A tracker with one live socket on a new topic whose position was read from the database."""
    registry = SocketRegistry()
    tracker = StreamTracker(registry, NoLog())  # type: ignore[arg-type]
    socket = FakeSocket("c-1", 1)
    topic = f"gaps-{uuid.uuid4().hex[:8]}"
    registry.add(socket)
    registry.subscribe(socket, topic)
    registry.go_live(socket, f"topic:{topic}")
    assert await tracker.loaded(f"topic:{topic}", WITHIN)
    yield Tracked(tracker, socket, topic)
    tracker.leave(socket, f"topic:{topic}")


def once(function):
    """`function` the first time it is called, a no-op after."""
    calls = []

    def first(*args: Any) -> None:
        if not calls:
            calls.append(args)
            function(*args)

    return first


def during_reads(monkeypatch, tracked: Tracked, action) -> None:
    """Run `action()` in the database thread right after the first read of a gap fill or resync,
    before its answer reaches the event loop."""
    real = streams_module.between
    act = once(lambda: action())

    def between(stream: str, after: int, before: int | None):
        answer = real(stream, after, before)
        act()
        return answer

    monkeypatch.setattr(streams_module, "between", between)


async def test_a_gap_after_a_resync_that_delivered_an_early_message_is_filled(tracked):
    # Seq 1 was lost with a node; 2 came through the restored queue; then the reconnection's
    # resync read both back and delivered them.
    _, two = await tracked.publish(2)
    tracked.tracker.arrive(two)
    await tracked.tracker.resync()
    assert tracked.socket.seqs() == [1, 2]
    # Later, seq 3 is lost (a nacked publish): 4 shows the gap, which is read back.
    _, four = await tracked.publish(2)
    tracked.tracker.arrive(four)
    await tracked.got([1, 2, 3, 4])
    assert tracked.state.early == {}


async def test_a_message_committed_while_a_fill_reads_is_not_taken_for_a_forgery(tracked, monkeypatch):
    # Seq 1 was lost; 2 shows it. While the resync reads the stream (its last seq: 2), seq 3 is
    # committed, published and reaches the instance before the read's answer does.
    loop = asyncio.get_running_loop()

    def publish_three() -> None:
        (three,) = tracked.publish_sync()
        loop.call_soon_threadsafe(tracked.tracker.arrive, three)

    during_reads(monkeypatch, tracked, publish_three)
    _, two = await tracked.publish(2)
    tracked.tracker.arrive(two)
    await tracked.tracker.resync()
    # No later message comes to show a gap: seq 3 goes out now or never.
    await tracked.got([1, 2, 3])


async def test_a_resync_while_a_gap_is_filled_still_reads_the_stream_to_its_end(tracked, monkeypatch):
    # Seqs 1 and 3 were lost with the queue, 2 came: a gap fill reads seq 1 (up to 2). While it
    # reads, the instance reconnects: its resync must still read what came after 2.
    loop = asyncio.get_running_loop()

    def reconnected() -> None:
        asyncio.run_coroutine_threadsafe(tracked.tracker.resync(), loop).result(WITHIN)

    during_reads(monkeypatch, tracked, reconnected)
    _, two, _ = await tracked.publish(3)
    tracked.tracker.arrive(two)
    await tracked.got([1, 2, 3])


@pytest.mark.parametrize("how", ["gap fill", "resync"])
async def test_a_read_that_failed_is_tried_again_without_a_later_message(tracked, monkeypatch, how):
    # The database is down for the first read of the stream: the read is tried again by itself,
    # since no later message may come to show the gap again.
    monkeypatch.setattr(streams_module, "FILL_RETRY_SECONDS", 0.1)
    real = streams_module.between
    failures = []

    def between(stream: str, after: int, before: int | None):
        if not failures:
            failures.append(stream)
            raise ConnectionError("the database is down")
        return real(stream, after, before)

    monkeypatch.setattr(streams_module, "between", between)
    _, two = await tracked.publish(2)
    if how == "gap fill":
        tracked.tracker.arrive(two)  # seq 1 was lost: 2 shows the gap
    else:
        await tracked.tracker.resync()  # both lost with a queue: only a resync can find them
    await tracked.got([1, 2])
    assert failures == [tracked.stream]
