"""Inbound frames across processes (CONTRACT §2-§5): real Daphne, real `run_workers`, real RabbitMQ.

Sockets `send` through web instances, workers compete for `<ns>.inbound`, and the echoes come back
through `<ns>.broadcast`. Every wait polls with a deadline; nothing sleeps to synchronise.
"""

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import aio_pika
import httpx
import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Count, Q
from django.utils import timezone

from notifications.models import InboundFrame, Message
from tests.conftest import make_user
from tests.support.broker import queue_stats
from tests.support.clients import LiveSocket, open_socket
from tests.support.cluster import Cluster
from tests.support.processes import Proc
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

# Generous: two cores, shared with other test runs.
SETTLE = 60.0
INBOUND_FIELDS = {
    "id",
    "user",
    "event",
    "payload",
    "status",
    "attempts",
    "processed_by",
    "accepted_at",
    "processed_at",
    "error",
}


# --- helpers -----------------------------------------------------------------------------


def db(function: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    return database_sync_to_async(function)


async def start(cluster: Cluster, webs: int = 1, workers: int = 1, **web_env: str) -> list[Proc]:
    """Start web instances and workers, and wait until all are ready (CONTRACT §1)."""
    # Persistent database connections in the processes, as deployed: a new connection per
    # frame triples the time of the load test. Processes are stopped before the database goes.
    cluster.extra_env.setdefault("DATABASE_CONN_MAX_AGE", "60")
    started = [cluster.add_web(**web_env) for _ in range(webs)]
    for _ in range(workers):
        cluster.add_worker()
    for web in started:
        await asyncio.to_thread(web.wait_ready)
    if workers:
        await wait_consumers(cluster, workers)
    return started


async def wait_consumers(cluster: Cluster, count: int) -> None:
    """`count` workers consume `<ns>.inbound` (Cluster.wait_workers_consuming refuses killed ones)."""

    async def consuming() -> bool:
        stats = await queue_stats(f"{cluster.namespace}.inbound")
        return stats is not None and stats[1] == count

    await eventually(consuming, SETTLE, f"{count} consumer(s) on {cluster.namespace}.inbound")


def receipts(socket: LiveSocket) -> dict[Any, str]:
    return {f["ref"]: f["id"] for f in socket.others if f["type"] == "receipt"}


def errors(socket: LiveSocket) -> list[dict[str, Any]]:
    return [f for f in socket.others if f["type"] == "error"]


def echoes(socket: LiveSocket) -> Counter[str]:
    return Counter(m["payload"]["inbound"] for m in socket.messages if m["event"] == "echo")


def echo_data(socket: LiveSocket) -> dict[str, Any]:
    return {m["payload"]["inbound"]: m["payload"]["data"] for m in socket.messages if m["event"] == "echo"}


async def send_and_receipt(socket: LiveSocket, ref: str, event: str, payload: Any) -> str:
    answer = await socket.request(
        {"type": "send", "ref": ref, "event": event, "payload": payload}, "receipt", timeout=SETTLE
    )
    assert answer == {"type": "receipt", "ref": ref, "id": answer.get("id")}, answer
    return answer["id"]


async def wait_echoes(socket: LiveSocket, ids: set[str], timeout: float = SETTLE) -> None:
    await socket.wait_for(
        lambda s: ids <= set(echoes(s)),
        timeout,
        what=f"the echoes of {len(ids)} frames",
    )


def frames_summary() -> dict[str, Any]:
    """Per frame: status, attempts, worker, and how many replies its processing committed."""
    return {
        str(frame.id): {
            "status": frame.status,
            "attempts": frame.attempts,
            "processed_by": frame.processed_by,
            "replies": frame.reply_count,
            "published": frame.published_count,
        }
        for frame in InboundFrame.objects.annotate(
            reply_count=_count("replies"), published_count=_count("replies", published=True)
        )
    }


def _count(relation: str, published: bool = False) -> Count:
    condition = Q(replies__status=Message.Status.PUBLISHED) if published else None
    return Count(relation, filter=condition)


async def all_processed(expected: int) -> bool:
    def check() -> bool:
        frames = InboundFrame.objects.all()
        return (
            frames.count() == expected
            and not frames.exclude(status=InboundFrame.Status.PROCESSED).exists()
            and not Message.objects.filter(source_inbound__isnull=False)
            .exclude(status=Message.Status.PUBLISHED)
            .exists()
        )

    return await db(check)()


# --- 1. many sockets, two instances, two workers -----------------------------------------


async def test_echo_load_over_two_instances_and_two_workers(cluster, users):
    """20 sockets x 50 frames: one receipt and one echo per frame per socket of its user, once."""
    sockets_per_instance, frames_per_socket = 10, 50
    web1, web2 = await start(cluster, webs=2, workers=2)
    people = await db(lambda: [make_user(f"load{n:02d}") for n in range(sockets_per_instance)])()

    async with httpx.AsyncClient(timeout=30) as client:
        # One socket of each user on each instance: an echo must reach both, wherever it was sent.
        pairs = [
            (await open_socket(client, web1, person), await open_socket(client, web2, person))
            for person in people
        ]
    sockets = [s for pair in pairs for s in pair]
    assert {s.welcome["instance"] for s in sockets} == {"web-1", "web-2"}

    async def send_all(index: int, socket: LiveSocket) -> None:
        # 50 frames at once fit the default burst (2 x RT_SOCKET_RATE = 100).
        for n in range(frames_per_socket):
            await socket.send(
                {"type": "send", "ref": f"{index}-{n}", "event": "echo", "payload": {"s": index, "n": n}}
            )

    started = time.monotonic()
    await asyncio.gather(*(send_all(i, s) for i, s in enumerate(sockets)))
    for index, socket in enumerate(sockets):
        await socket.wait_for(
            lambda s: len(receipts(s)) + len(errors(s)) >= frames_per_socket, SETTLE, what="receipts"
        )
        assert errors(socket) == [], errors(socket)[:3]
        assert set(receipts(socket)) == {f"{index}-{n}" for n in range(frames_per_socket)}
    receipted = time.monotonic() - started

    # Every inbound id of a user is echoed to both of that user's sockets, with the data sent.
    for pair_index, pair in enumerate(pairs):
        sent = {}
        for offset, socket in enumerate(pair):
            index = 2 * pair_index + offset
            sent |= {
                frame_id: {"s": index, "n": int(ref.split("-")[1])}
                for ref, frame_id in receipts(socket).items()
            }
        assert len(sent) == 2 * frames_per_socket, "receipt ids are unique"
        for socket in pair:
            await wait_echoes(socket, set(sent), timeout=90)
    echoed = time.monotonic() - started

    await eventually(lambda: all_processed(len(sockets) * frames_per_socket), SETTLE, "every frame processed")
    for pair_index, pair in enumerate(pairs):
        own = {fid for socket in pair for fid in receipts(socket).values()}
        for socket in pair:
            counts = echoes(socket)
            assert set(counts) == own, "only the user's own echoes"
            assert set(counts.values()) == {1}, [fid for fid, c in counts.items() if c > 1][:3]
            data = echo_data(socket)
            for offset, sender in enumerate(pair):
                index = 2 * pair_index + offset
                for ref, frame_id in receipts(sender).items():
                    assert data[frame_id] == {"s": index, "n": int(ref.split("-")[1])}

    summary = await db(frames_summary)()
    assert len(summary) == len(sockets) * frames_per_socket
    assert {(f["status"], f["attempts"], f["replies"], f["published"]) for f in summary.values()} == {
        ("processed", 1, 1, 1)
    }
    by_worker = Counter(f["processed_by"] for f in summary.values())
    assert set(by_worker) == {"worker-1", "worker-2"}, by_worker
    print(
        f"\n{len(summary)} frames: all receipts in {receipted:.1f}s, all echoes in {echoed:.1f}s; "
        f"per worker {dict(by_worker)}"
    )
    for socket in sockets:
        await socket.close()


# --- 2. a worker killed mid-stream --------------------------------------------------------


async def test_worker_killed_mid_stream_loses_and_repeats_nothing(cluster, users):
    """SIGKILL a worker with frames in flight; a replacement finishes: each frame processed once."""
    # Frames are queued before any worker runs, so the queue holds a backlog when the victim
    # dies: its prefetch is full, and some of its frames sleep in their handlers.
    (web,) = await start(cluster, webs=1, workers=0)
    senders = ["alice", "bob", "carol"]
    before_kill, after_kill = 40, 10
    async with httpx.AsyncClient(timeout=30) as client:
        sockets = {name: await open_socket(client, web, users[name]) for name in senders}

    async def send_all(name: str, socket: LiveSocket, numbers: range) -> None:
        for n in numbers:
            # Every other frame takes 300 ms in its handler, so the victim dies holding some.
            if n % 2:
                event, payload = "diag.sleep", {"ms": 300}
            else:
                event, payload = "echo", {"who": name, "n": n}
            await socket.send({"type": "send", "ref": f"{name}-{n}", "event": event, "payload": payload})

    async def all_receipted(count: int) -> None:
        for socket in sockets.values():
            await socket.wait_for(
                lambda s: len(receipts(s)) + len(errors(s)) >= count, SETTLE, what="receipts"
            )
            assert errors(socket) == [], errors(socket)[:3]

    await asyncio.gather(*(send_all(name, s, range(before_kill)) for name, s in sockets.items()))
    await all_receipted(before_kill)
    queued = len(senders) * before_kill
    # Frames that arrive together travel together (one broker message holds several).
    messages, consumers = await queue_stats(f"{cluster.namespace}.inbound")
    assert 0 < messages <= queued and consumers == 0, (messages, consumers)
    assert await db(lambda: InboundFrame.objects.filter(status="accepted").count())() == queued

    victim = cluster.add_worker()
    cluster.add_worker()
    await wait_consumers(cluster, 2)

    async def victim_busy() -> bool:
        return await db(
            lambda: InboundFrame.objects.filter(processed_by=victim.name, status="processed").count() >= 3
        )()

    await eventually(victim_busy, SETTLE, f"{victim.name} processing")
    victim.signal(signal.SIGKILL)
    await asyncio.to_thread(victim.process.wait, 10)
    processed_at_kill = await db(lambda: InboundFrame.objects.filter(status="processed").count())()
    backlog = queued - processed_at_kill
    assert backlog > 0, "the victim died mid-stream, with frames not yet processed"

    # Its replacement (worker-3) competes with the survivor for the rest, and for new frames.
    cluster.add_worker()
    await wait_consumers(cluster, 2)
    await asyncio.gather(
        *(send_all(name, s, range(before_kill, before_kill + after_kill)) for name, s in sockets.items())
    )
    await all_receipted(before_kill + after_kill)
    total = len(senders) * (before_kill + after_kill)
    await eventually(lambda: all_processed(total), 90, "every frame processed")
    for socket in sockets.values():
        await wait_echoes(socket, set(receipts(socket).values()))

    summary = await db(frames_summary)()
    assert len(summary) == total
    for frame_id, frame in summary.items():
        # One committed processing per frame: exactly one reply, published.
        assert (frame["status"], frame["replies"], frame["published"]) == ("processed", 1, 1), (
            frame_id,
            frame,
        )
    for name, socket in sockets.items():
        counts = echoes(socket)
        assert set(counts) == set(receipts(socket).values()), name
        assert set(counts.values()) == {1}, (name, [fid for fid, c in counts.items() if c > 1])
    by_worker = Counter(f["processed_by"] for f in summary.values())
    assert by_worker[victim.name] >= 3 and by_worker["worker-3"] > 0, by_worker
    # The frames the victim held unacked were redelivered, and count its lost attempt.
    retried = {fid: f for fid, f in summary.items() if f["attempts"] >= 2}
    assert retried, "no frame was in flight when the worker was killed"
    assert all(f["processed_by"] != victim.name for f in retried.values()), retried
    print(
        f"\nkilled {victim.name} after {processed_at_kill}/{total} frames ({backlog} queued); "
        f"per worker {dict(by_worker)}; {len(retried)} frame(s) redelivered"
    )
    for socket in sockets.values():
        await socket.close()


# --- 3. crash between commit and ack ------------------------------------------------------


async def test_crash_between_commit_and_ack_is_not_processed_twice(cluster, users):
    """The worker dies after its commit: the replacement acks, publishes the pending echo once."""
    (web,) = await start(cluster, webs=1, workers=0)
    crasher = cluster.add_worker(RT_TEST_CRASH_AFTER_COMMIT="1")
    await wait_consumers(cluster, 1)
    async with httpx.AsyncClient(timeout=30) as client:
        alice = await open_socket(client, web, users["alice"])

    frame_id = await send_and_receipt(alice, "c1", "echo", {"crash_after_commit": True})
    await asyncio.to_thread(lambda: crasher.process.wait(SETTLE))  # the hook exits the process on this frame
    assert crasher.process.returncode == 137, crasher.log_tail()

    frame = await db(lambda: InboundFrame.objects.get(id=frame_id))()
    assert (frame.status, frame.attempts, frame.processed_by) == ("processed", 1, crasher.name)
    reply = await db(lambda: Message.objects.get(source_inbound_id=frame_id))()
    assert reply.status == Message.Status.ACCEPTED, "committed, never published"
    assert echoes(alice) == Counter()

    replacement = cluster.add_worker()
    await wait_consumers(cluster, 1)
    await wait_echoes(alice, {frame_id})
    # A frame sent after the crash goes through the replacement too.
    later = await send_and_receipt(alice, "c2", "echo", {"after": "crash"})
    await wait_echoes(alice, {later})
    await eventually(lambda: all_processed(2), SETTLE, "both frames processed")

    assert echoes(alice) == Counter({frame_id: 1, later: 1})
    assert echo_data(alice)[frame_id] == {"crash_after_commit": True}
    summary = await db(frames_summary)()
    assert summary[frame_id] == {
        "status": "processed",
        "attempts": 1,
        "processed_by": crasher.name,
        "replies": 1,
        "published": 1,
    }
    assert summary[later]["processed_by"] == replacement.name
    await alice.close()


# --- 4. a failing frame: retried with backoff, dead-lettered, requeued --------------------


async def test_failing_frame_is_retried_then_dead_while_others_flow(cluster, users, bridge):
    """diag.fail: 5 attempts (1, 2, 4, 8 s apart), then `dead`, in the dead queue and the API."""
    (web,) = await start(cluster, webs=1, workers=1)
    worker = cluster.workers[0]
    async with httpx.AsyncClient(timeout=30) as client:
        alice = await open_socket(client, web, users["alice"])
        started = time.monotonic()
        failing = await send_and_receipt(alice, "f1", "diag.fail", {"why": "testing"})

        async def failing_frame() -> InboundFrame:
            return await db(lambda: InboundFrame.objects.get(id=failing))()

        # Echoes sent after it flow while it waits for its retries.
        for batch in range(2):
            if batch:
                await eventually(
                    lambda: _attempts_at_least(failing, 3), SETTLE, "the third attempt of diag.fail"
                )
            ids = {await send_and_receipt(alice, f"e{batch}-{n}", "echo", {"n": n}) for n in range(5)}
            await wait_echoes(alice, ids)
            frame = await failing_frame()
            assert frame.status == InboundFrame.Status.FAILED and frame.attempts < 5, (
                frame.status,
                frame.attempts,
            )
            assert "DiagnosticFailure" in frame.error

        await eventually(
            lambda: _status_is(failing, InboundFrame.Status.DEAD), SETTLE, "diag.fail dead-lettered"
        )
        frame = await failing_frame()
        elapsed = (frame.processed_at - frame.accepted_at).total_seconds()
        assert frame.attempts == 5
        assert frame.processed_by == worker.name
        assert frame.error == "DiagnosticFailure: diag.fail always fails"
        # Four back-offs of 1 + 2 + 4 + 8 seconds, and dead within a minute (CONTRACT §3).
        assert 15 <= elapsed < 60, elapsed
        print(f"\ndiag.fail dead after {elapsed:.1f}s (test saw it at {time.monotonic() - started:.1f}s)")

        async def dead_queued() -> bool:
            stats = await queue_stats(f"{cluster.namespace}.inbound.dead")
            return stats is not None and stats[0] >= 1

        await eventually(dead_queued, SETTLE, "the frame in the dead-letter queue")
        assert (await queue_stats(f"{cluster.namespace}.inbound.dead"))[0] == 1
        assert await peek_frame_id(f"{cluster.namespace}.inbound.dead") == failing

        url = f"{web.url}/api/v1/inbound/{failing}/"
        response = await client.get(url, headers=users["alice"].headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == INBOUND_FIELDS
        assert body["status"] == "dead" and body["attempts"] == 5
        assert body["event"] == "diag.fail" and body["payload"] == {"why": "testing"}
        assert body["error"] == "DiagnosticFailure: diag.fail always fails"
        assert body["processed_by"] == worker.name and body["user"] == "alice"

        # The admin's requeue: a dead frame gets a fresh set of attempts. Requeue the failing
        # frame and an echo that was never queued (as when the broker was down at its `send`).
        from notifications.services.requeue import requeue_dead_frames

        def unqueued_echo() -> str:
            frame = InboundFrame.objects.create(
                user_id=InboundFrame.objects.get(id=failing).user_id,
                event="echo",
                payload={"requeued": True},
                ref="u1",
                status=InboundFrame.Status.DEAD,
                error="not queued: broker down (simulated)",
                processed_at=timezone.now(),
            )
            return str(frame.id)

        stranded = await db(unqueued_echo)()
        outcome = await db(lambda: requeue_dead_frames([uuid.UUID(failing), uuid.UUID(stranded)]))()
        assert (outcome.requeued, outcome.error) == (2, "")
        await wait_echoes(alice, {stranded})
        await eventually(lambda: _status_is(stranded, InboundFrame.Status.PROCESSED), SETTLE, "requeued echo")

        async def failing_again() -> bool:
            frame = await failing_frame()
            return frame.status == InboundFrame.Status.FAILED and frame.attempts >= 1

        await eventually(failing_again, SETTLE, "the requeued diag.fail attempted again")
        frame = await failing_frame()
        assert frame.attempts < 5 and "DiagnosticFailure" in frame.error
        assert echoes(alice)[stranded] == 1
    await alice.close()


def test_requeue_leaves_dead_frames_as_they_were_when_the_broker_is_down(users, namespace, publisher):
    """The admin's requeue with no broker: nothing queued, the records keep their history."""
    from consumers_app.bridge import InstanceBridge
    from notifications.services.requeue import requeue_dead_frames

    publisher(InstanceBridge())  # never connected
    fields = ["status", "attempts", "error", "processed_at", "processed_by"]
    frames = [
        InboundFrame.objects.create(
            user_id=User.objects.get(username="alice").pk,
            event="diag.fail",
            payload={"n": n},
            status=InboundFrame.Status.DEAD,
            attempts=5,
            processed_by="worker-9",
            error="DiagnosticFailure: diag.fail always fails",
            processed_at=timezone.now(),
        )
        for n in range(2)
    ]
    before = list(InboundFrame.objects.order_by("id").values("id", *fields))

    outcome = requeue_dead_frames([frame.id for frame in frames])

    assert outcome.requeued == 0 and outcome.error
    assert list(InboundFrame.objects.order_by("id").values("id", *fields)) == before


async def peek_frame_id(queue_name: str) -> str | None:
    """The frame id of the first message of a queue, which stays there (JSON, CONTRACT §2)."""
    connection = await aio_pika.connect(settings.AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        message = await queue.get(no_ack=False, fail=False, timeout=10)
        if message is None:
            return None
        await message.reject(requeue=True)
        assert message.content_type == "application/json"
        return json.loads(message.body)["id"]
    finally:
        await connection.close()


async def _attempts_at_least(frame_id: str, attempts: int) -> bool:
    return await db(lambda: InboundFrame.objects.filter(id=frame_id, attempts__gte=attempts).exists())()


async def _status_is(frame_id: str, status: str) -> bool:
    return await db(lambda: InboundFrame.objects.filter(id=frame_id, status=status).exists())()


# --- 5. bad input is refused at the socket, nothing queued ---------------------------------


BAD_SENDS = [
    ({"type": "send", "ref": "b1", "event": "no.such.event", "payload": {}}, "unknown_type"),
    ({"type": "send", "ref": "b2", "event": "echo", "payload": "x" * 2000}, "too_large"),
    ({"type": "send", "ref": "b3", "event": "echo", "payload": "x", "pad": "y" * 5000}, "too_large"),
    ({"type": "send", "ref": "b4", "payload": {}}, "invalid"),
    ({"type": "send", "ref": "b5", "event": 42, "payload": {}}, "invalid"),
    ({"type": "send", "ref": "b6", "event": None, "payload": {}}, "invalid"),
    ({"type": "send", "ref": "b7", "event": "", "payload": {}}, "invalid"),
    ({"type": "send", "ref": 8, "event": ["echo"], "payload": {}}, "invalid"),
    ({"type": "send", "ref": "b9", "event": "diag.sleep", "payload": {"ms": 10001}}, "invalid"),
    ({"type": "send", "ref": "b10", "event": "diag.sleep", "payload": {"ms": -1}}, "invalid"),
    ({"type": "send", "ref": "b11", "event": "diag.sleep", "payload": {"ms": "5"}}, "invalid"),
    ({"type": "send", "ref": "b12", "event": "diag.sleep", "payload": {"ms": True}}, "invalid"),
    ({"type": "send", "ref": "b13", "event": "diag.sleep", "payload": {}}, "invalid"),
    ({"type": "send", "ref": "b14", "event": "diag.sleep"}, "invalid"),
]


async def test_bad_sends_get_errors_and_queue_nothing(cluster, users):
    (web,) = await start(cluster, webs=1, workers=0, RT_MAX_PAYLOAD_BYTES="1000", RT_MAX_FRAME_BYTES="4000")
    async with httpx.AsyncClient(timeout=30) as client:
        bob = await open_socket(client, web, users["bob"])
    for frame, code in BAD_SENDS:
        answer = await bob.request(frame, "receipt")
        assert answer["type"] == "error", (frame, answer)
        assert (answer["code"], answer["ref"]) == (code, frame["ref"]), (frame, answer)
        assert answer["detail"]
    assert await bob.request({"type": "ping"}, "pong") == {"type": "pong"}
    assert bob.closed_code is None, "the socket stays open"
    assert not [f for f in bob.others if f["type"] == "receipt"]
    assert await db(InboundFrame.objects.count)() == 0
    assert await queue_stats(f"{cluster.namespace}.inbound") == (0, 0)
    await bob.close()


async def test_frames_sent_together_travel_together_and_a_refused_row_fails_alone(cluster, users):
    """Frames of many sockets that arrive together share a broker message (CONTRACT §2 says
    nothing of one message per frame); one with a payload no database can store fails alone."""
    (web,) = await start(cluster, webs=1, workers=0)
    names = ["alice", "bob", "carol"] * 3
    async with httpx.AsyncClient(timeout=30) as client:
        sockets = [await open_socket(client, web, users[name]) for name in names]
    per_socket = 5
    # PostgreSQL cannot store U+0000 in a JSON value: refused at the socket, holding up nothing.
    poisoned = {"type": "send", "ref": "nul", "event": "echo", "payload": {"text": "a\u0000b"}}

    async def send_burst(index: int, socket: LiveSocket) -> None:
        for n in range(per_socket):
            await socket.send({"type": "send", "ref": f"s{index}-{n}", "event": "echo", "payload": {"n": n}})
        if index == 4:
            await socket.send(poisoned)

    await asyncio.gather(*(send_burst(i, s) for i, s in enumerate(sockets)))
    for index, socket in enumerate(sockets):
        expected = per_socket + (index == 4)
        await socket.wait_for(
            lambda s, expected=expected: len(receipts(s)) + len(errors(s)) >= expected,
            SETTLE,
            what="receipts",
        )
    refused = errors(sockets[4])
    assert [(e["code"], e["ref"]) for e in refused] == [("invalid", "nul")], refused
    assert "U+0000" in refused[0]["detail"]
    good = len(sockets) * per_socket
    assert all(errors(s) == [] for i, s in enumerate(sockets) if i != 4)
    assert sum(len([r for r in receipts(s) if r != "nul"]) for s in sockets) == good

    stored = await db(lambda: InboundFrame.objects.filter(status="accepted").count())()
    messages, _ = await queue_stats(f"{cluster.namespace}.inbound")
    assert stored == good
    assert 0 < messages < stored, f"{stored} frames in {messages} broker messages"

    # A worker takes them all, and each frame is echoed exactly once.
    cluster.add_worker()
    await wait_consumers(cluster, 1)
    for socket in sockets:
        await wait_echoes(socket, set(receipts(socket).values()))
        assert set(echoes(socket).values()) == {1}
    await eventually(lambda: all_processed(stored), SETTLE, "every frame processed")
    print(f"\n{stored} frames queued in {messages} broker messages")
    for socket in sockets:
        await socket.close()


async def test_broker_messages_a_worker_cannot_read_are_dead_lettered_not_left_unacked(cluster, users):
    """Anything else may publish to `<ns>.inbound`: what is not frames goes to the dead queue."""
    (web,) = await start(cluster, webs=1, workers=1)
    bad_bodies = [b"not json", b'{"frames": []}', b'{"frames": [1, 2]}', b'{"frames": "x"}', b"[]"]
    connection = await aio_pika.connect(settings.AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for body in bad_bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, content_type="application/json"),
                routing_key=f"{cluster.namespace}.inbound",
            )
    finally:
        await connection.close()

    async def all_dead() -> bool:
        stats = await queue_stats(f"{cluster.namespace}.inbound.dead")
        return stats is not None and stats[0] >= len(bad_bodies)

    await eventually(all_dead, SETTLE, "the unreadable messages in the dead-letter queue")
    assert (await queue_stats(f"{cluster.namespace}.inbound.dead"))[0] == len(bad_bodies)
    # Nothing stays unacked in the worker: a frame after them is echoed as usual.
    async with httpx.AsyncClient(timeout=30) as client:
        alice = await open_socket(client, web, users["alice"])
    frame_id = await send_and_receipt(alice, "after", "echo", {"n": 1})
    await wait_echoes(alice, {frame_id})
    assert await queue_stats(f"{cluster.namespace}.inbound") == (0, 1)
    await alice.close()


# --- 6. GET /api/v1/inbound/{id}/ ----------------------------------------------------------


async def test_inbound_record_is_visible_to_its_sender_and_staff_only(cluster, users):
    (web,) = await start(cluster, webs=1, workers=1)
    async with httpx.AsyncClient(timeout=30) as client:
        alice = await open_socket(client, web, users["alice"])
        frame_id = await send_and_receipt(alice, "r1", "echo", {"hello": [1, 2]})
        await wait_echoes(alice, {frame_id})
        await eventually(lambda: all_processed(1), SETTLE, "the frame processed")

        url = f"{web.url}/api/v1/inbound/{frame_id}/"
        own = await client.get(url, headers=users["alice"].headers)
        assert own.status_code == 200, own.text
        body = own.json()
        assert set(body) == INBOUND_FIELDS
        assert {k: body[k] for k in INBOUND_FIELDS - {"accepted_at", "processed_at"}} == {
            "id": frame_id,
            "user": "alice",
            "event": "echo",
            "payload": {"hello": [1, 2]},
            "status": "processed",
            "attempts": 1,
            "processed_by": "worker-1",
            "error": "",
        }
        accepted, processed = (datetime.fromisoformat(body[k]) for k in ("accepted_at", "processed_at"))
        assert accepted.utcoffset() == timedelta(0) and accepted <= processed

        staff = await client.get(url, headers=users["staff"].headers)
        assert (staff.status_code, staff.json()) == (200, body)
        other = await client.get(url, headers=users["bob"].headers)
        assert other.status_code == 404 and "detail" in other.json()
        missing = await client.get(
            f"{web.url}/api/v1/inbound/{uuid.uuid4()}/", headers=users["staff"].headers
        )
        assert missing.status_code == 404
        anonymous = await client.get(url)
        assert anonymous.status_code == 401 and "WWW-Authenticate" in anonymous.headers
    await alice.close()


# --- 7. a slow handler ------------------------------------------------------------------------


async def test_a_slow_handler_holds_up_only_its_own_batch(cluster, users):
    """One lane takes batches while they run quickly (`lane_gate`); a batch that runs long lets
    another lane take the frames that arrive behind it, so one slow frame stalls nobody else."""
    sleep_ms = 8000
    (web,) = await start(cluster, webs=1, workers=1)
    async with httpx.AsyncClient(timeout=30) as client:
        alice = await open_socket(client, web, users["alice"])
        bob = await open_socket(client, web, users["bob"])
        slow_id = await send_and_receipt(alice, "slow", "diag.sleep", {"ms": sleep_ms})

        async def taken() -> bool:  # by the worker, whose only running lane now sleeps
            stats = await queue_stats(f"{cluster.namespace}.inbound")
            return stats is not None and stats[0] == 0

        await eventually(taken, SETTLE, "the slow frame taken by the worker")
        quick = {await send_and_receipt(bob, f"quick-{n}", "echo", {"n": n}) for n in range(5)}
        await wait_echoes(bob, quick, timeout=sleep_ms / 1000 * 2)
        assert slow_id not in echoes(alice), "the quick frames waited for the slow one"

        await wait_echoes(alice, {slow_id})
    await eventually(lambda: all_processed(6), SETTLE, "every frame processed")
    await alice.close()
    await bob.close()
