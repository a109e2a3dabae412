"""Which live sockets of this instance want which messages: by user, by topic, and all."""

from collections import defaultdict
from typing import Any, Protocol


class Socket(Protocol):
    connection_id: str
    user_id: int

    def deliver(self, frame: bytes, wire: bytes | None = None) -> bool: ...

    async def close_with(self, code: int, reason: str) -> None: ...


class SocketRegistry:
    """Plain dicts and sets: the event loop is the only thread that touches them."""

    def __init__(self) -> None:
        self.sockets: set[Socket] = set()
        self.by_user: dict[int, set[Socket]] = defaultdict(set)
        self.by_topic: dict[str, set[Socket]] = defaultdict(set)
        self.topics_of: dict[Socket, set[str]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self.sockets)

    def add(self, socket: Socket) -> None:
        self.sockets.add(socket)
        self.by_user[socket.user_id].add(socket)

    def remove(self, socket: Socket) -> None:
        self.sockets.discard(socket)
        _discard(self.by_user, socket.user_id, socket)
        for topic in self.topics_of.pop(socket, ()):
            _discard(self.by_topic, topic, socket)

    def subscribe(self, socket: Socket, topic: str) -> None:
        if socket in self.sockets:
            self.by_topic[topic].add(socket)
            self.topics_of[socket].add(topic)

    def unsubscribe(self, socket: Socket, topic: str) -> None:
        _discard(self.by_topic, topic, socket)
        topics = self.topics_of.get(socket)
        if topics is not None:
            topics.discard(topic)

    def targets(self, body: dict[str, Any]) -> list[Socket]:
        """The sockets a broker message is for (a snapshot: delivery may change the sets)."""
        if body.get("broadcast"):
            return list(self.sockets)
        topic = body.get("topic")
        if topic:
            return list(self.by_topic.get(topic, ()))
        user_id = body.get("user_id")
        if user_id is not None:
            return list(self.by_user.get(user_id, ()))
        return []


def _discard(index: dict, key: Any, socket: Socket) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(socket)
        if not members:
            del index[key]
