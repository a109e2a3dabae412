"""consumers_app/outbound.py `corked`: a socket's frames of one broker message in one write.

The sockets are Daphne-shaped fakes over a fake kernel socket that records each `send` call, so
the tests see how many writes a socket got, not only the bytes.
"""

import asyncio

import pytest

from consumers_app import outbound as outbound_module
from consumers_app.outbound import Outbound, corked
from consumers_app.transport import text_frame
from tests.unit.test_transport import FakeSocket, FakeTransport, fake_protocol


def open_socket(buffer_limit: int = 1 << 20) -> tuple[Outbound, list[bytes]]:
    """An Outbound whose protocol is an open Daphne-like WebSocket over a socket that records
    each `send` call; the calls' data."""
    sock = FakeSocket()
    out = Outbound.__new__(Outbound)
    out.label = "test"
    out.closing = False
    out.protocol = fake_protocol(FakeTransport(sock))
    out.buffer_limit = buffer_limit
    out.outbox = None
    out.writer = None
    return out, sock.sent


def frame(n: int) -> bytes:
    return f'{{"type":"message","seq":{n}}}'.encode()


def test_outside_a_corked_block_each_frame_is_written_at_once():
    out, sent = open_socket()
    assert out.deliver(frame(1)) is True
    assert out.deliver(frame(2)) is True
    assert sent == [text_frame(frame(1)), text_frame(frame(2))]


def test_a_sockets_frames_in_a_corked_block_go_in_one_write_in_order():
    alice, alice_sent = open_socket()
    bob, bob_sent = open_socket()
    with corked():
        for n in (1, 2, 3):
            assert alice.deliver(frame(n)) is True
        assert bob.deliver(frame(10), text_frame(frame(10))) is True
        assert alice_sent == [] and bob_sent == [], "nothing leaves before the block ends"
    assert alice_sent == [text_frame(frame(1)) + text_frame(frame(2)) + text_frame(frame(3))]
    assert bob_sent == [text_frame(frame(10))]


def test_a_nested_block_leaves_the_writing_to_the_outer_one():
    out, sent = open_socket()
    with corked():
        out.deliver(frame(1))
        with corked():
            out.deliver(frame(2))
        assert sent == []
        out.deliver(frame(3))
    assert sent == [b"".join(text_frame(frame(n)) for n in (1, 2, 3))]


def test_frames_given_before_an_error_are_still_written():
    out, sent = open_socket()
    with pytest.raises(RuntimeError), corked():
        out.deliver(frame(1))
        raise RuntimeError("a later message failed")
    assert sent == [text_frame(frame(1))]
    assert outbound_module._pending() is None, "the block is over: the next frame goes out at once"
    out.deliver(frame(2))
    assert sent[-1] == text_frame(frame(2))


def test_a_socket_that_is_not_open_is_refused_inside_the_block_too():
    out, sent = open_socket()
    out.protocol.state = 4  # closing
    with corked():
        assert out.deliver(frame(1)) is False
    assert sent == []


def test_a_socket_closed_by_the_server_meanwhile_gets_nothing():
    out, sent = open_socket()
    with corked():
        assert out.deliver(frame(1)) is True
        out.closing = True  # e.g. closed as a slow reader by an earlier message
    assert sent == []


def test_the_slow_reader_limit_is_checked_when_the_frames_are_written(monkeypatch):
    closed = []
    out, sent = open_socket(buffer_limit=10)
    monkeypatch.setattr(out, "close_slow_reader", closed.append)
    out.protocol.transport._tempDataLen = 50  # the client is not reading: bytes wait already
    with corked():
        out.deliver(frame(1))
        assert closed == []
    assert out.protocol.transport.written == [text_frame(frame(1))], "queued behind what waits"
    assert closed and "unread" in closed[0]


def test_a_socket_whose_write_fails_does_not_keep_the_others_frames_back(monkeypatch, caplog):
    broken, _ = open_socket()
    fine, fine_sent = open_socket()
    broken.label = "the broken one"

    def fail(wire: bytes) -> bool:
        raise RuntimeError("a transport that breaks")

    monkeypatch.setattr(broken, "write_now", fail)
    with corked():
        broken.deliver(frame(1))
        fine.deliver(frame(2))
    assert fine_sent == [text_frame(frame(2))]
    assert "the broken one" in caplog.text


async def test_a_callback_or_task_made_inside_the_block_writes_when_it_runs():
    """Callbacks and tasks carry the context they were made in (a gap fill's timer, say): a
    frame they give after the block must still leave, not wait for a block that has ended."""
    out, sent = open_socket()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    async def later_task() -> None:
        out.deliver(frame(3))
        done.set()

    with corked():
        out.deliver(frame(1))
        loop.call_soon(out.deliver, frame(2))
        task = loop.create_task(later_task())
    assert sent == [text_frame(frame(1))]
    await task
    await asyncio.wait_for(done.wait(), 1)
    assert sent == [text_frame(frame(1)), text_frame(frame(2)), text_frame(frame(3))]
