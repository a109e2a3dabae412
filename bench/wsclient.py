"""A lean WebSocket client for the benchmarks' client processes (RFC 6455, text frames only).

The `websockets` library costs a client process about 80 µs of CPU per frame on this machine
(its protocol object, a future and a task switch per frame). With 500 sockets in one client
process, one fan-out message then took 40 ms of the client's own time to read, which the
latency figures counted against the server. This reader parses frames in `data_received` and
hands each to a callback with the time it was read: a few µs per frame. It is the measuring
instrument, the same for the project and the baseline; the tests use `websockets`.
"""

import asyncio
import base64
import hashlib
import os
import struct
import time
from collections.abc import Callable
from urllib.parse import urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0

FrameCallback = Callable[[float, str], None]


class ConnectionClosed(Exception):
    """The socket closed (by either side)."""


class LeanWebSocket(asyncio.Protocol):
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handshake_done = False
        self.expected_accept = b""
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.on_frame: FrameCallback | None = None
        self._queue: list[tuple[float, str]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        arrived = time.time()
        self.buffer += data
        if not self.handshake_done and not self._read_handshake():
            return
        self._read_frames(arrived)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = 1006
        if not self.opened.done():
            self.opened.set_exception(ConnectionClosed(f"closed ({self.close_code})"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    # --- handshake -------------------------------------------------------------------------

    def start_handshake(self, host: str, port: int, target: str) -> None:
        key = base64.b64encode(os.urandom(16))
        self.expected_accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.transport.write(request.encode())

    def _read_handshake(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        status, *lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        if (
            " 101 " not in f"{status} "
            or headers.get("sec-websocket-accept", "").encode() != self.expected_accept
        ):
            self.opened.set_exception(ConnectionClosed(f"handshake refused: {status}"))
            self.transport.close()
            return False
        self.handshake_done = True
        self.opened.set_result(None)
        return True

    # --- frames ----------------------------------------------------------------------------

    def _read_frames(self, arrived: float) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            length, offset = second & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                (length,), offset = struct.unpack_from("!H", buffer, 2), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                (length,), offset = struct.unpack_from("!Q", buffer, 2), 10
            if second & 0x80 or length > self.max_size:
                self.close_code = 1002  # a server must not mask its frames; or far too large
                self.transport.close()
                return
            if len(buffer) < offset + length:
                return
            payload = bytes(buffer[offset : offset + length])
            del buffer[: offset + length]
            self._frame(first & 0x80, first & 0x0F, payload, arrived)

    def _frame(self, fin: int, opcode: int, payload: bytes, arrived: float) -> None:
        if opcode in (TEXT, BINARY, CONTINUATION):
            self._fragments.append(payload)
            if not fin:
                return
            text = b"".join(self._fragments).decode()
            self._fragments = []
            if self.on_frame is not None:
                self.on_frame(arrived, text)
            else:
                self._queue.append((arrived, text))
                self._wake()
        elif opcode == PING:
            self._send(PONG, payload)
        elif opcode == CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self._send(CLOSE, payload[:2])
            self.transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _send(self, opcode: int, payload: bytes) -> None:
        """A client frame: masked, as RFC 6455 requires."""
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
        if not self.transport.is_closing():
            self.transport.write(header + mask + masked)

    # --- what the benchmarks call --------------------------------------------------------

    async def send(self, text: str) -> None:
        if self.close_code is not None:
            raise ConnectionClosed(f"closed ({self.close_code})")
        self._send(TEXT, text.encode())

    async def recv(self) -> str:
        """The next text frame (while no `on_frame` callback is set)."""
        while not self._queue:
            if self.close_code is not None:
                raise ConnectionClosed(f"closed ({self.close_code})")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._queue.pop(0)[1]

    def deliver_to(self, callback: FrameCallback) -> None:
        """From now on, hand each frame (and those already queued) to `callback(arrived, text)`."""
        for arrived, text in self._queue:
            callback(arrived, text)
        self._queue.clear()
        self.on_frame = callback

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    async def close(self, timeout: float = 2.0) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._send(CLOSE, struct.pack("!H", 1000))
        try:
            await asyncio.wait_for(self.wait_closed(), timeout)
        except TimeoutError:
            self.transport.abort()


async def connect(url: str, open_timeout: float, max_size: int = 2**20) -> LeanWebSocket:
    """Open `ws://host:port/path?query`; raise ConnectionClosed if the server refuses it."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()

    async def open_() -> LeanWebSocket:
        _, protocol = await loop.create_connection(
            lambda: LeanWebSocket(max_size), parts.hostname, parts.port
        )
        protocol.start_handshake(parts.hostname, parts.port, target)
        await protocol.opened
        return protocol

    return await asyncio.wait_for(open_(), open_timeout)
