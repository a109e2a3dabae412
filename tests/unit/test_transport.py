"""consumers_app/transport.py: the fast send path under Daphne, and what it relies on.

The fast path reaches into Daphne's protocol and Twisted's TCP transport through attributes
that are no public API. Every one of them is checked here against the installed packages, so
an upgrade that would silently turn the fast path off (or break it) fails in seconds.
"""

import functools
import socket
import struct
from types import SimpleNamespace

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from consumers_app import transport
from consumers_app.transport import daphne_protocol, text_frame, unsent_bytes, write_frame

# --- text_frame ------------------------------------------------------------------------------


def parse(data: bytes) -> Frame:
    """Parse one server frame with an independent parser (websockets), unmasked as RFC 6455 wants."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as done:
        next(parser)
    assert reader.at_eof(), "bytes left over after the frame"
    return done.value.value


@pytest.mark.parametrize(
    "length, header",
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e" + struct.pack("!H", 126)),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
        (1_000_000, b"\x81\x7f" + struct.pack("!Q", 1_000_000)),
    ],
)
def test_text_frame_header_per_rfc_6455(length, header):
    payload = b"x" * length
    frame = text_frame(payload)
    assert frame == header + payload
    # FIN set, no RSV bits, opcode 1 (text); no mask bit from a server.
    assert frame[0] == 0b1000_0001
    assert frame[1] & 0x80 == 0
    parsed = parse(frame)
    assert (parsed.opcode, parsed.fin, parsed.data) == (Opcode.TEXT, True, payload)


def test_text_frame_carries_utf8_bytes_as_they_are():
    payload = '{"t":"é€😀"}'.encode()
    assert parse(text_frame(payload)).data.decode() == '{"t":"é€😀"}'


# --- daphne_protocol ------------------------------------------------------------------------


class FakeProtocol:
    """What daphne_protocol recognises Daphne's WebSocketProtocol by."""

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False):
        pass


class FakeServer:
    async def handle_reply(self, protocol, message):
        pass


class Wrapper:
    """Wraps `send` the way Channels' InstanceSessionWrapper does: `real_send`, and its own `send`."""

    def __init__(self, send):
        self.real_send = send

    async def send(self, message):
        return await self.real_send(message)


def daphne_send(protocol):
    """Daphne's ASGI send: `partial(server.handle_reply, protocol)`."""
    return functools.partial(FakeServer().handle_reply, protocol)


def test_finds_the_protocol_behind_daphnes_own_send():
    protocol = FakeProtocol()
    assert daphne_protocol(daphne_send(protocol)) is protocol


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_finds_the_protocol_through_wrappers_with_real_send(layers):
    protocol = FakeProtocol()
    send = daphne_send(protocol)
    for _ in range(layers):
        send = Wrapper(send).send
    assert daphne_protocol(send) is protocol


def test_finds_the_protocol_through_channels_own_session_wrapper():
    from channels.sessions import InstanceSessionWrapper

    protocol = FakeProtocol()
    wrapper = InstanceSessionWrapper({"type": "websocket", "cookies": {}}, daphne_send(protocol))
    assert daphne_protocol(wrapper.send) is protocol


@pytest.mark.django_db
async def test_finds_the_protocol_through_the_projects_socket_middleware():
    """The send the consumer gets under the real middleware stack (Origin check, session auth;
    the session store may be asked, so the database is allowed)."""
    from consumers_app.auth import protected

    protocol = FakeProtocol()
    seen = {}

    async def app(scope, receive, send):
        seen["send"] = send

    async def receive():
        return {"type": "websocket.connect"}

    scope = {"type": "websocket", "path": "/ws/", "headers": [], "query_string": b""}
    await protected(app)(scope, receive, daphne_send(protocol))
    assert daphne_protocol(seen["send"]) is protocol


def test_none_for_a_plain_function_or_another_server():
    async def send(message):
        pass

    assert daphne_protocol(send) is None
    assert daphne_protocol(Wrapper(send).send) is None
    # A partial whose first argument is not a WebSocket protocol.
    assert daphne_protocol(functools.partial(FakeServer().handle_reply, object())) is None
    assert daphne_protocol(functools.partial(print)) is None
    assert daphne_protocol(None) is None


# --- what the fast path relies on in the installed Daphne, Autobahn and Twisted --------------


def test_daphne_sends_through_server_handle_reply_with_the_protocol_first():
    import inspect

    import daphne.server

    handle_reply = daphne.server.Server.handle_reply
    assert inspect.iscoroutinefunction(handle_reply)
    assert list(inspect.signature(handle_reply).parameters)[:3] == ["self", "protocol", "message"]
    # ... and the application instance gets `partial(self.handle_reply, protocol)` as its send.
    source = inspect.getsource(daphne.server.Server.create_application)
    assert "partial(self.handle_reply, protocol)" in source


def test_daphnes_websocket_protocol_has_what_the_fast_path_uses():
    from daphne.ws_protocol import WebSocketProtocol

    assert callable(WebSocketProtocol.sendCloseFrame)
    assert hasattr(WebSocketProtocol, "transport")
    assert isinstance(WebSocketProtocol.STATE_OPEN, int)
    assert WebSocketProtocol.STATE_OPEN != WebSocketProtocol.STATE_CONNECTING


def test_twisted_tcp_transport_has_what_the_fast_path_uses():
    from twisted.internet import tcp

    left, right = socket.socketpair()
    try:
        connection = tcp.Server(left, None, ("127.0.0.1", 1), None, 1, _QuietReactor())
        for name in ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnected", "TLS", "socket"):
            assert hasattr(connection, name), name
        assert connection.socket is left
        assert (connection.dataBuffer, connection.offset, connection._tempDataLen) == (b"", 0, 0)
        assert connection.TLS is False and connection._writeDisconnected is False
        # write() buffers into exactly the fields unsent_bytes() reads.
        connection.connected = 1
        connection.write(b"abc")
        assert connection._tempDataLen == 3
        assert unsent_bytes(SimpleNamespace(transport=connection)) == 3
    finally:
        left.close()
        right.close()


def test_a_real_daphne_protocol_on_a_real_tcp_transport_takes_the_fast_path():
    """Daphne's protocol over Twisted's TCP transport (a socketpair): closed while connecting,
    and once open, a frame goes to the kernel at once, readable on the other end."""
    from daphne.ws_protocol import WebSocketFactory
    from twisted.internet import address, tcp

    factory = WebSocketFactory(object(), url="ws://127.0.0.1:1", server="test")
    protocol = factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 1234))
    left, right = socket.socketpair()
    try:
        connection = tcp.Server(left, protocol, ("127.0.0.1", 1234), None, 1, _QuietReactor())
        connection.connected = 1
        protocol.makeConnection(connection)
        assert protocol.transport is connection
        assert protocol.state == protocol.STATE_CONNECTING
        assert daphne_protocol(daphne_send(protocol)) is protocol
        assert write_frame(protocol, text_frame(b"early")) is False

        protocol.state = protocol.STATE_OPEN
        right.setblocking(False)
        assert write_frame(protocol, text_frame(b"hello")) is True
        assert right.recv(100) == b"\x81\x05hello"
        assert unsent_bytes(protocol) == 0
        assert connection._tempDataLen == 0, "the fast path was not taken"
    finally:
        left.close()
        right.close()


class _QuietReactor:
    """A reactor that registers nothing (the test drives the transport itself)."""

    def addReader(self, reader):
        pass

    def addWriter(self, writer):
        pass

    def removeReader(self, reader):
        pass

    def removeWriter(self, writer):
        pass


# --- write_frame on fakes --------------------------------------------------------------------


class FakeSocket:
    def __init__(self, takes: int | None = None, raises: type[Exception] | None = None):
        self.takes = takes
        self.raises = raises
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.raises is not None:
            raise self.raises()
        taken = len(data) if self.takes is None else min(self.takes, len(data))
        self.sent.append(bytes(data[:taken]))
        return taken


class FakeTransport:
    def __init__(self, sock: FakeSocket, **fields):
        self.connected = 1
        self.TLS = False
        self._writeDisconnected = False
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.offset = 0
        self.socket = sock
        self.written: list[bytes] = []
        for name, value in fields.items():
            setattr(self, name, value)

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))


def fake_protocol(transport_, state: int = 3) -> SimpleNamespace:
    return SimpleNamespace(state=state, STATE_OPEN=3, transport=transport_)


FRAME = text_frame(b"0123456789")


def test_sends_straight_to_the_socket_when_nothing_is_buffered():
    sock = FakeSocket()
    fake = FakeTransport(sock)
    assert write_frame(fake_protocol(fake), FRAME) is True
    assert sock.sent == [FRAME]
    assert fake.written == []


@pytest.mark.parametrize(
    "fields",
    [
        {"dataBuffer": b"waiting", "offset": 0},
        {"dataBuffer": b"waiting", "offset": 3},
        {"_tempDataLen": 5},
        {"TLS": True},
        {"_writeDisconnected": True},
        {"connected": 0},
    ],
    ids=["buffered", "partly-written-buffer", "temp-buffer", "tls", "write-disconnected", "not-connected"],
)
def test_falls_back_to_transport_write_when_the_socket_cannot_take_it_now(fields):
    sock = FakeSocket()
    fake = FakeTransport(sock, **fields)
    assert write_frame(fake_protocol(fake), FRAME) is True
    assert sock.sent == []
    assert fake.written == [FRAME], "order must be kept: the frame queues behind what waits"


def test_a_fully_written_buffer_does_not_block_the_fast_path():
    sock = FakeSocket()
    fake = FakeTransport(sock, dataBuffer=b"done", offset=4)
    assert write_frame(fake_protocol(fake), FRAME) is True
    assert sock.sent == [FRAME] and fake.written == []


def test_a_partial_send_writes_the_rest_through_the_transport():
    sock = FakeSocket(takes=3)
    fake = FakeTransport(sock)
    assert write_frame(fake_protocol(fake), FRAME) is True
    assert sock.sent == [FRAME[:3]]
    assert fake.written == [FRAME[3:]]
    assert b"".join(sock.sent + fake.written) == FRAME


@pytest.mark.parametrize("error", [BlockingIOError, ConnectionResetError, OSError])
def test_a_socket_error_hands_the_whole_frame_to_twisted(error):
    fake = FakeTransport(FakeSocket(raises=error))
    assert write_frame(fake_protocol(fake), FRAME) is True
    assert fake.written == [FRAME]


def test_a_transport_that_is_not_twisted_tcp_gets_write():
    written = []
    other = SimpleNamespace(write=written.append)  # no socket, no buffer fields
    assert write_frame(fake_protocol(other), FRAME) is True
    assert written == [FRAME]


def test_nothing_is_written_to_a_socket_that_is_not_open():
    sock = FakeSocket()
    fake = FakeTransport(sock)
    assert write_frame(fake_protocol(fake, state=4), FRAME) is False
    assert sock.sent == [] and fake.written == []


def test_unsent_bytes_counts_buffer_and_pending_writes():
    fake = FakeTransport(FakeSocket(), dataBuffer=b"0123456789", offset=4, _tempDataLen=7)
    assert unsent_bytes(SimpleNamespace(transport=fake)) == 6 + 7
    assert unsent_bytes(SimpleNamespace(transport=SimpleNamespace())) == 0


def test_close_with_code_sends_any_rfc_6455_code_with_a_short_reason():
    calls = []
    protocol = SimpleNamespace(sendCloseFrame=lambda **kw: calls.append(kw))
    transport.close_with_code(protocol, 1013, "é" * 100)
    (call,) = calls
    assert call["code"] == 1013 and call["isReply"] is False
    assert len(call["reasonUtf8"]) <= 123
