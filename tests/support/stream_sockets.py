"""Stand-ins for a socket and the delivery log, for StreamTracker and SocketRegistry tests
(tests/unit/test_stream_order.py, tests/test_stream_gaps.py, tests/unit/test_registry.py):
frames are kept as the JSON a client would read."""

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(eq=False)
class FakeSocket:
    connection_id: str
    user_id: int
    frames: list = field(default_factory=list)

    def deliver(self, frame: bytes, wire: bytes | None = None) -> bool:
        self.frames.append(orjson.loads(frame))
        return True

    async def close_with(self, code: int, reason: str) -> None:
        pass

    def seqs(self) -> list[int]:
        return [frame["seq"] for frame in self.frames]


class NoLog:
    def record_deliveries(self, *args: Any) -> None:
        pass
