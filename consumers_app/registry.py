"""Which sockets this instance holds, and which of them each stream is delivered to now.

A socket is in `sockets` (and `by_user`) from its welcome to its close; it is subscribed to its
topics (`topics_of`); and it is `live` on a stream (`broadcast`, `user:ID`, `topic:T`) once it
has caught up with it, so delivering a message is one set lookup. Plain dicts and sets: the
event loop is the only thread that touches them.
"""

from collections import defaultdict
from typing import Any, Protocol

from notifications.services.streams import BROADCAST, topic_stream, user_stream


class Socket(Protocol):
    connection_id: str
    user_id: int

    def deliver(self, frame: bytes, wire: bytes | None = None) -> bool: ...

    async def close_with(self, code: int, reason: str) -> None: ...


class SocketRegistry:
    def __init__(self) -> None:
        self.sockets: set[Socket] = set()
        self.by_user: dict[int, set[Socket]] = defaultdict(set)
        self.topics_of: dict[Socket, set[str]] = defaultdict(set)
        self.live: dict[str, set[Socket]] = {}

    def __len__(self) -> int:
        return len(self.sockets)

    def add(self, socket: Socket) -> None:
        self.sockets.add(socket)
        self.by_user[socket.user_id].add(socket)

    def remove(self, socket: Socket) -> None:
        """Forget a socket everywhere (harmless if it is already gone)."""
        self.sockets.discard(socket)
        _discard(self.by_user, socket.user_id, socket)
        _discard(self.live, BROADCAST, socket)
        _discard(self.live, user_stream(socket.user_id), socket)
        for topic in self.topics_of.pop(socket, ()):
            _discard(self.live, topic_stream(topic), socket)

    def subscribe(self, socket: Socket, topic: str) -> None:
        if socket in self.sockets:
            self.topics_of[socket].add(topic)

    def unsubscribe(self, socket: Socket, topic: str) -> None:
        _discard(self.live, topic_stream(topic), socket)
        topics = self.topics_of.get(socket)
        if topics is not None:
            topics.discard(topic)

    def go_live(self, socket: Socket, stream: str) -> None:
        """Deliver `stream` to the socket from now on (it has caught up)."""
        if socket in self.sockets:
            self.live.setdefault(stream, set()).add(socket)

    def stop_live(self, socket: Socket, stream: str) -> None:
        _discard(self.live, stream, socket)

    def targets(self, stream: str) -> list[Socket]:
        """The sockets `stream` is delivered to now (a snapshot: delivery may change the sets)."""
        return list(self.live.get(stream, ()))


def _discard(index: dict[Any, set[Socket]], key: Any, socket: Socket) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(socket)
        if not members:
            del index[key]
