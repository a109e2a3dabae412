"""consumers_app/streams.py: a stream's messages reach each socket in seq order, once.

The stream's position is set directly (as the database read would), so these run without a
database; filling a gap from the database is covered by the black-box tests.
"""

import uuid

import pytest

from consumers_app.registry import SocketRegistry
from consumers_app.streams import Catchup, StreamState, StreamTracker
from notifications.services.streams import Recovery
from tests.support.stream_sockets import FakeSocket, NoLog


def body(seq: int, stream: str = "topic:t", epoch: str = "e1") -> dict:
    return {"id": str(uuid.uuid4()), "stream": stream, "seq": seq, "epoch": epoch, "topic": "t"}


@pytest.fixture
def tracked():
    registry = SocketRegistry()
    tracker = StreamTracker(registry, NoLog())
    socket = FakeSocket("c-1", 1)
    registry.add(socket)
    registry.subscribe(socket, "t")
    registry.go_live(socket, "topic:t")
    state = tracker.states["topic:t"] = StreamState("topic:t")
    tracker._position_known(state, Recovery("topic:t", 4, "e1", recovered=False))
    return tracker, socket, state


async def test_in_order_messages_go_out_at_once_and_copies_are_dropped(tracked):
    tracker, socket, state = tracked
    for seq in (5, 6, 6, 4, 7):
        tracker.arrive(body(seq))
    assert socket.seqs() == [5, 6, 7]
    assert state.next_seq == 8
    assert socket.frames[0]["stream"] == "topic:t" and socket.frames[0]["epoch"] == "e1"


async def test_a_later_seq_waits_for_the_earlier_one(tracked):
    tracker, socket, state = tracked
    tracker.arrive(body(7))
    tracker.arrive(body(6))
    assert socket.seqs() == []
    assert state.gap_timer is not None
    tracker.arrive(body(5))
    assert socket.seqs() == [5, 6, 7]
    assert state.gap_timer is None and not state.early


async def test_messages_that_arrive_before_the_position_is_known_are_sorted_out_after(tracked):
    tracker, socket, _ = tracked
    fresh = tracker.states["topic:u"] = StreamState("topic:u")
    tracker.registry.subscribe(socket, "u")
    tracker.registry.go_live(socket, "topic:u")
    for seq in (3, 1, 2):
        tracker.arrive(body(seq, "topic:u"))
    tracker._position_known(fresh, Recovery("topic:u", 1, "e1", recovered=False))
    assert socket.seqs() == [2, 3]  # seq 1 was before the position: not this socket's


async def test_a_catching_up_socket_gets_held_messages_after_its_floor_then_goes_live(tracked):
    tracker, socket, state = tracked
    late = FakeSocket("c-2", 2)
    tracker.registry.add(late)
    catchup = state.catchups[late] = Catchup()
    tracker.arrive(body(5))
    tracker.arrive(body(6))
    assert late.frames == [] and [seq for seq, *_ in catchup.frames] == [5, 6]
    # The database answered up to seq 6 (the caller replays 5 and 6 itself): held copies go.
    catchup.floor, catchup.ready, catchup.frames = 6, True, []
    tracker.arrive(body(7))
    assert late.seqs() == [7]
    assert late in tracker.registry.targets("topic:t") and late not in state.catchups


async def test_a_new_epoch_starts_the_numbering_again(tracked):
    tracker, socket, state = tracked
    tracker.arrive(body(5))
    tracker.arrive(body(1, epoch="e2"))
    tracker.arrive(body(2, epoch="e2"))
    assert socket.seqs() == [5, 1, 2]
    assert state.epoch == "e2" and state.next_seq == 3
