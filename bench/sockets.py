"""The socket clients of the benchmarks, run in their own processes (multiprocessing, spawn).

The measuring process only publishes and counts; the sockets live here, so their CPU is not
spent inside the publisher's event loop. Each client process talks to the orchestrator over a
Pipe: it reports `ready` once its sockets are open, waits for a command, then reports results.
Arrival times are `time.time()` taken as a frame is read, before it is parsed.
"""

import asyncio
import collections
import gc
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import httpx
import orjson

from bench import wsclient

# Handshakes in flight at once per client process (Daphne gives a handshake 5 s by default).
CONNECT_CONCURRENCY = 25
OPEN_TIMEOUT = 30.0
# After the last expected frame, keep reading this long to catch duplicates.
GRACE_SECONDS = 1.0


@dataclass
class SocketSpec:
    port: int
    user: str
    token: str | None  # None: the baseline, which has no authentication


@dataclass
class Sock:
    spec: SocketSpec
    ws: Any
    instance: str
    frames: list[tuple[float, str]] = field(default_factory=list)
    closed_code: int | None = None
    closed: bool = False


class Tickets:
    """One ticket per (instance, user), reused while young (a ticket is valid RT_TICKET_TTL s)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.cache: dict[tuple[int, str], tuple[str, float]] = {}

    async def get(self, spec: SocketSpec) -> str:
        key = (spec.port, spec.user)
        cached = self.cache.get(key)
        if cached is not None and time.monotonic() - cached[1] < 30:
            return cached[0]
        response = await self.http.post(
            f"http://127.0.0.1:{spec.port}/api/v1/ws-tickets/",
            headers={"Authorization": f"Token {spec.token}"},
        )
        response.raise_for_status()
        ticket = response.json()["ticket"]
        self.cache[key] = (ticket, time.monotonic())
        return ticket


async def open_socket(spec: SocketSpec, tickets: Tickets, topic: str | None) -> Sock:
    url = f"ws://127.0.0.1:{spec.port}/ws/"
    if spec.token is not None:
        url += "?ticket=" + await tickets.get(spec)
    ws = await wsclient.connect(url, OPEN_TIMEOUT)
    try:
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT))
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"first frame is not a welcome: {welcome}")
        if topic is not None:
            await ws.send(orjson.dumps({"type": "subscribe", "topic": topic}).decode())
            while True:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT))
                if frame.get("type") == "subscribed":
                    break
                if frame.get("type") == "error":
                    raise RuntimeError(f"subscribe refused: {frame}")
    except BaseException:
        await ws.close()
        raise
    return Sock(spec=spec, ws=ws, instance=str(welcome.get("instance")))


async def open_all(
    specs: list[SocketSpec], topic: str | None, deadline: float
) -> tuple[list[Sock], list[str]]:
    """Open every socket, CONNECT_CONCURRENCY at a time, within `deadline` seconds."""
    sockets: list[Sock] = []
    errors: list[str] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    limits = httpx.Limits(max_connections=CONNECT_CONCURRENCY, max_keepalive_connections=CONNECT_CONCURRENCY)
    async with httpx.AsyncClient(timeout=OPEN_TIMEOUT, limits=limits) as http:
        tickets = Tickets(http)

        async def one(spec: SocketSpec) -> None:
            async with gate:
                try:
                    sockets.append(await open_socket(spec, tickets, topic))
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])

        tasks = [asyncio.create_task(one(spec)) for spec in specs]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        if pending:
            errors.append(f"{len(pending)} sockets not opened within {deadline:.0f}s")
            await asyncio.gather(*pending, return_exceptions=True)
    return sockets, errors


async def close_all(sockets: list[Sock]) -> None:
    async def close(sock: Sock) -> None:
        try:
            await asyncio.wait_for(sock.ws.close(), 5)
        except Exception:
            pass

    for start in range(0, len(sockets), 200):
        await asyncio.gather(*(close(s) for s in sockets[start : start + 200]))


def _say(conn: Connection, kind: str) -> None:
    """Tell the orchestrator, which may have stopped listening already."""
    try:
        conn.send((kind, {}))
    except (OSError, ValueError):
        pass


async def recv_command(conn: Connection) -> tuple[str, dict[str, Any]]:
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


# --- fan-out listeners --------------------------------------------------------------------


def without_collector() -> None:
    """No garbage collection in a client process: it keeps every frame it reads, and a full
    collection over them (tens of ms, at the same message of every run) was timestamped as
    delivery latency. A run is bounded, and so is the memory it keeps."""
    gc.disable()


def _client_main(
    client: Callable[[Connection, dict[str, Any]], Awaitable[None]], conn: Connection, cfg: dict[str, Any]
) -> None:
    """A client process's body: no collector, `client` in an event loop, a failure reported."""
    without_collector()
    try:
        asyncio.run(client(conn, cfg))
    except Exception as exc:
        conn.send(("failed", {"error": f"{type(exc).__name__}: {exc}"}))


def listener_main(conn: Connection, cfg: dict[str, Any]) -> None:
    _client_main(_listener, conn, cfg)


async def _listener(conn: Connection, cfg: dict[str, Any]) -> None:
    specs = [SocketSpec(**s) for s in cfg["sockets"]]
    started = time.monotonic()
    sockets, errors = await open_all(specs, cfg.get("topic"), cfg["open_deadline"])
    state = {"count": 0, "target": 1 << 62, "last": time.monotonic()}
    done = asyncio.Event()

    async def read(sock: Sock) -> None:
        frames = sock.frames

        def on_frame(arrived: float, raw: str) -> None:
            frames.append((arrived, raw))
            state["count"] += 1
            state["last"] = time.monotonic()
            if state["count"] >= state["target"]:
                done.set()

        sock.ws.deliver_to(on_frame)
        try:
            await sock.ws.wait_closed()
        finally:
            sock.closed = True
            sock.closed_code = sock.ws.close_code

    readers = [asyncio.create_task(read(sock)) for sock in sockets]
    conn.send(
        (
            "ready",
            {
                "opened": len(sockets),
                "errors": errors[:10],
                "failed": len(specs) - len(sockets),
                "seconds": round(time.monotonic() - started, 2),
                "instances": dict(collections.Counter(s.instance for s in sockets)),
            },
        )
    )
    try:
        while True:
            command, arg = await recv_command(conn)
            if command == "close":
                break
            if command == "expect":
                state["target"] = arg["per_socket"] * len(sockets)
                if state["count"] >= state["target"]:
                    done.set()
                limit = time.monotonic() + arg["deadline"]
                while not done.is_set() and time.monotonic() < limit:
                    if time.monotonic() - state["last"] > arg["quiet"]:
                        break
                    try:
                        await asyncio.wait_for(done.wait(), 0.5)
                    except TimeoutError:
                        pass
                timed_out = not done.is_set()
                await asyncio.sleep(GRACE_SECONDS)  # deliberate: late duplicates arrive now
                conn.send(("result", _fanout_result(sockets, timed_out)))
    finally:
        await close_all(sockets)
        for reader in readers:
            reader.cancel()
        _say(conn, "closed")


def _fanout_result(sockets: list[Sock], timed_out: bool) -> dict[str, Any]:
    out = []
    others: collections.Counter[str] = collections.Counter()
    for sock in sockets:
        arrivals = []
        for arrived, raw in sock.frames:
            frame = orjson.loads(raw)
            payload = frame.get("payload")
            if frame.get("type") == "message" and isinstance(payload, dict) and "seq" in payload:
                arrivals.append((payload["seq"], arrived))
            else:
                others[f"{frame.get('type')}:{frame.get('code', '')}"] += 1
        out.append({"instance": sock.instance, "arrivals": arrivals, "closed_code": sock.closed_code})
        sock.frames = []
    return {"sockets": out, "others": dict(others), "timed_out": timed_out}


# --- inbound senders ----------------------------------------------------------------------


def sender_main(conn: Connection, cfg: dict[str, Any]) -> None:
    _client_main(_sender, conn, cfg)


@dataclass
class SenderState:
    sent: dict[int, float] = field(default_factory=dict)
    receipts: dict[str, str] = field(default_factory=dict)
    receipt_times: dict[str, float] = field(default_factory=dict)
    echoes: list[tuple[str, int, float, float, str | None]] = field(default_factory=list)
    echoed: set[int] = field(default_factory=set)
    errors: collections.Counter = field(default_factory=collections.Counter)
    settled: int = 0


async def _sender(conn: Connection, cfg: dict[str, Any]) -> None:
    specs = [SocketSpec(**s) for s in cfg["sockets"]]
    sockets, errors = await open_all(specs, None, cfg["open_deadline"])
    conn.send(("ready", {"opened": len(sockets), "errors": errors[:10], "failed": len(specs) - len(sockets)}))
    try:
        command, arg = await recv_command(conn)
        if command != "go":
            return
        frames, window = arg["frames"], arg["window"]
        states = [SenderState() for _ in sockets]
        progress = {"last": time.monotonic(), "settled": 0}
        total = frames * len(sockets)
        all_done = asyncio.Event()

        async def run(index: int, sock: Sock) -> None:
            state = states[index]
            slots = asyncio.Semaphore(window) if window else None

            def settle(i: int | None) -> None:
                state.settled += 1
                progress["settled"] += 1
                progress["last"] = time.monotonic()
                if slots is not None:
                    slots.release()
                if progress["settled"] >= total:
                    all_done.set()

            def on_frame(arrived: float, raw: str) -> None:
                frame = orjson.loads(raw)
                kind = frame.get("type")
                if kind == "receipt":
                    state.receipts[str(frame.get("ref"))] = str(frame.get("id"))
                    state.receipt_times[str(frame.get("ref"))] = arrived
                elif kind == "message" and frame.get("event") == "echo":
                    payload = frame.get("payload") or {}
                    data = payload.get("data") or {}
                    i = int(data.get("i", -1))
                    state.echoes.append(
                        (
                            str(payload.get("inbound")),
                            i,
                            data.get("t", 0.0),
                            arrived,
                            payload.get("worker"),
                        )
                    )
                    if i not in state.echoed:
                        state.echoed.add(i)
                        settle(i)
                elif kind == "error":
                    state.errors[str(frame.get("code"))] += 1
                    settle(None)
                else:
                    state.errors[f"unexpected:{kind}"] += 1

            async def read() -> None:
                sock.ws.deliver_to(on_frame)
                await sock.ws.wait_closed()
                state.errors["closed"] += 1

            reader = asyncio.create_task(read())
            try:
                for i in range(frames):
                    if slots is not None:
                        await slots.acquire()
                    sent = time.time()
                    state.sent[i] = sent
                    await sock.ws.send(
                        orjson.dumps(
                            {
                                "type": "send",
                                "ref": f"{index}-{i}",
                                "event": "echo",
                                "payload": {"s": index, "i": i, "t": sent},
                            }
                        ).decode()
                    )
                await all_done.wait()
            finally:
                reader.cancel()

        tasks = [asyncio.create_task(run(i, sock)) for i, sock in enumerate(sockets)]
        limit = time.monotonic() + arg["deadline"]
        timed_out = False
        while not all_done.is_set():
            if time.monotonic() > limit or time.monotonic() - progress["last"] > arg["quiet"]:
                timed_out = True
                break
            try:
                await asyncio.wait_for(all_done.wait(), 0.5)
            except TimeoutError:
                pass
        await asyncio.sleep(GRACE_SECONDS)  # deliberate: late duplicates arrive now
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn.send(
            (
                "result",
                {
                    "timed_out": timed_out,
                    "sockets": [
                        {
                            "sent": s.sent,
                            "receipts": s.receipts,
                            "receipt_times": s.receipt_times,
                            "echoes": s.echoes,
                            "errors": dict(s.errors),
                        }
                        for s in states
                    ],
                },
            )
        )
    finally:
        await close_all(sockets)
        _say(conn, "closed")


# --- the orchestrator's side --------------------------------------------------------------


class ClientPool:
    """Client processes (spawned), each holding a share of the sockets."""

    def __init__(self, target_fn: Any, configs: list[dict[str, Any]]) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.Process] = []
        for cfg in configs:
            parent, child = context.Pipe()
            proc = context.Process(target=target_fn, args=(child, cfg), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def send(self, command: str, arg: dict[str, Any] | None = None) -> None:
        for pipe in self.pipes:
            pipe.send((command, arg or {}))

    def collect(self, expected: str, timeout: float) -> list[dict[str, Any]]:
        """One `expected` report from every process, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        out = []
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"client process {proc.pid}: no {expected!r} within {timeout:.0f}s")
                if pipe.poll(min(remaining, 1.0)):
                    kind, data = pipe.recv()
                    if kind == "failed":
                        raise RuntimeError(f"client process {proc.pid} failed: {data['error']}")
                    if kind == expected:
                        out.append(data)
                        break
                elif not proc.is_alive():
                    raise RuntimeError(f"client process {proc.pid} died (exit code {proc.exitcode})")
        return out

    def stop(self) -> None:
        """Ask every client to close its sockets; terminate (then kill) those that do not exit."""
        for pipe in self.pipes:
            try:
                pipe.send(("close", {}))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for pipe in self.pipes:
            pipe.close()
