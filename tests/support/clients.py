"""Clients for tests: API calls with a token, and sockets that collect what they receive.

A `server` here is anything with the `url` and `ws_url` of a web instance: a Proc of
tests/support/processes.py, or a load balancer in front of several.
"""

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import websockets


@dataclass
class ApiUser:
    username: str
    token: str
    password: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}


class Server(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def ws_url(self) -> str: ...


async def ticket(client: httpx.AsyncClient, base_url: str, user: ApiUser) -> str:
    response = await client.post(f"{base_url}/api/v1/ws-tickets/", headers=user.headers)
    response.raise_for_status()
    return response.json()["ticket"]


@dataclass
class LiveSocket:
    """A live socket that reads in the background and sorts frames by type."""

    ws: Any
    welcome: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)
    others: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task | None = None
    closed_code: int | None = None

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> "LiveSocket":
        ws = await websockets.connect(url, open_timeout=10, **kwargs)
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome", welcome
        socket = cls(ws=ws, welcome=welcome)
        socket.reader = asyncio.create_task(socket._read())
        return socket

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                (self.messages if frame.get("type") == "message" else self.others).append(frame)
                self.changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed_code = self.ws.close_code
            self.changed.set()

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def wait_for(self, predicate, timeout: float = 10.0, what: str = "frames") -> None:
        """Wait until `predicate(self)` holds, woken by each frame (no fixed sleeps)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"timed out waiting for {what}: {len(self.messages)} messages, {self.others[-3:]}"
                )
            self.changed.clear()
            if predicate(self):
                return
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass

    async def request(self, frame: dict[str, Any], expect: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send a frame and wait for the next non-message frame of type `expect` (or an error)."""
        start = len(self.others)
        await self.send(frame)

        def answered(s: "LiveSocket") -> bool:
            return any(f["type"] in (expect, "error") for f in s.others[start:])

        await self.wait_for(answered, timeout, what=expect)
        return next(f for f in self.others[start:] if f["type"] in (expect, "error"))

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 10)


async def open_socket(http: httpx.AsyncClient, server: Server, user: ApiUser) -> LiveSocket:
    """A live socket of `user` on `server`, with a fresh ticket."""
    return await LiveSocket.open(f"{server.ws_url}?ticket={await ticket(http, server.url, user)}")


async def post_message(http: httpx.AsyncClient, server: Server, user: ApiUser, body: dict) -> httpx.Response:
    """POST /api/v1/messages/ as `user`, whatever the answer."""
    return await http.post(f"{server.url}/api/v1/messages/", json=body, headers=user.headers)


def accepted(response: httpx.Response) -> dict[str, Any]:
    """The record of a message the API accepted (202)."""
    assert response.status_code == 202, response.text
    return response.json()


async def publish(http: httpx.AsyncClient, server: Server, user: ApiUser, body: dict) -> dict[str, Any]:
    """Publish through the API: the message must be accepted and published; its record."""
    record = accepted(await post_message(http, server, user, body))
    assert record["status"] == "published"
    return record


def publish_sync(server: Server, user: ApiUser, body: dict) -> dict[str, Any]:
    """POST /api/v1/messages/ from sync code (the browser tests): it must be accepted; its record."""
    return accepted(httpx.post(f"{server.url}/api/v1/messages/", json=body, headers=user.headers, timeout=20))
