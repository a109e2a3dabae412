"""The server's side of a socket, where Daphne lets us reach it.

Daphne's ASGI `send` is `partial(server.handle_reply, protocol)` (wrapped by Channels' session
middleware), so its WebSocket protocol and Twisted transport are reachable. Two things need them:
- backpressure: Daphne buffers whatever is sent, without limit, for a client that stops reading;
  the transport's write buffer tells how much is waiting;
- fan-out: a server's frames are not masked, so one message's WebSocket frame is the same bytes
  for every socket; building it once and writing it to each transport skips Autobahn's framing
  per socket (a third of the fan-out's time);
- close codes: Daphne (through Autobahn) only lets applications close with 1000 or 3000-4999,
  but 1001 "going away" and 1013 "try again later" are the codes clients act on.
Under another server, or WebsocketCommunicator in tests, neither is reachable and the consumer
falls back to plain ASGI (no backlog check; the close code passed through as is).
"""

import random
import struct
import time
from typing import Any


def daphne_protocol(send: Any) -> Any | None:
    """Daphne's WebSocketProtocol behind an ASGI `send` callable, or None."""
    for _ in range(5):
        wrapper = getattr(send, "__self__", None)
        inner = getattr(wrapper, "real_send", None)
        if inner is None:
            break
        send = inner
    args = getattr(send, "args", ())
    protocol = args[0] if args else None
    return protocol if hasattr(protocol, "sendCloseFrame") else None


def unsent_bytes(protocol: Any) -> int:
    """Bytes written to the socket that its client has not yet taken."""
    try:
        transport = protocol.transport
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:  # not a Twisted TCP transport
        return 0


def spread_keepalive(protocol: Any) -> None:
    """Start this socket's keepalive clock at a random point of Daphne's ping interval.

    Daphne pings a socket `ping_interval` (20) s after its last frame. Sockets opened together
    (a deploy, a reconnect storm, a benchmark) would all be pinged in the same second, and all
    their pongs parsed together: a pause of tens of ms every interval, which showed as the
    slowest messages of the steady fan-out. Spread, the same pings cost a little every second.
    """
    try:
        interval = float(protocol.server.ping_interval)
    except (AttributeError, TypeError, ValueError):
        return
    protocol.last_ping = time.time() - random.uniform(0, interval)


def close_with_code(protocol: Any, code: int, reason: str) -> None:
    """Start the closing handshake with any RFC 6455 code (Autobahn drops the peer if it never answers)."""
    protocol.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked RFC 6455 text frame carrying `payload` (UTF-8)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


def write_frame(protocol: Any, frame: bytes) -> bool:
    """Write a ready-made frame to an open socket; False if it is no longer open.

    Twisted's `write` only buffers: the bytes leave on the reactor's next turn, after two
    epoll changes and a write callback per socket, which is most of a fan-out's cost. When
    nothing is waiting in the transport's buffer (so order is kept), the frame goes to the
    kernel at once; whatever the kernel does not take goes through `write` as before.
    """
    if protocol.state != protocol.STATE_OPEN:
        return False
    transport = protocol.transport
    if _can_send_now(transport):
        try:
            sent = transport.socket.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # Twisted's own write finds the error and closes the connection
        if sent == len(frame):
            return True
        frame = frame[sent:]
    transport.write(frame)
    return True


def _can_send_now(transport: Any) -> bool:
    """A plain TCP transport, open, with nothing buffered (called once per socket and message)."""
    try:
        return (
            transport.connected
            and not transport.TLS
            and not transport._writeDisconnected
            and not transport._tempDataLen
            and len(transport.dataBuffer) == transport.offset
        )
    except AttributeError:  # not a Twisted TCP transport
        return False
