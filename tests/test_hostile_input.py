"""Hostile input against real processes (CONTRACT §5.3, §5.6): Daphne, workers, RabbitMQ, PostgreSQL.

Values at the edges of what JSON parsers accept, frames that used to crash a consumer, and
malformed messages on the deployment's own queues and exchanges: each gets a clear answer or
is put aside, and meanwhile other users' traffic flows, sockets stay open, nothing is kept
after it closed, and no queue is left holding a message. Every wait polls with a deadline.
"""

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import httpx
import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import Group, User
from prometheus_client.parser import text_string_to_metric_families

from notifications.models import InboundFrame, Message, Topic
from tests.conftest import make_user
from tests.support.broker import queue_stats
from tests.support.clients import ApiUser, LiveSocket, open_socket, post_message, publish
from tests.support.cluster import Cluster
from tests.support.processes import Proc
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

# Generous: two cores, shared with other test runs.
SETTLE = 60.0
DEEP = (240, 254, 255, 270, 700)


# --- helpers -----------------------------------------------------------------------------


def db(function: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    return database_sync_to_async(function)


async def start(cluster: Cluster, workers: int = 1, **web_env: str) -> Proc:
    """One web instance (with `web_env`) and `workers` workers, all ready (CONTRACT §1)."""
    cluster.extra_env.setdefault("DATABASE_CONN_MAX_AGE", "60")
    web = cluster.add_web(**web_env)
    for _ in range(workers):
        cluster.add_worker()
    await asyncio.to_thread(web.wait_ready)
    if workers:

        async def consuming() -> bool:
            stats = await queue_stats(f"{cluster.namespace}.inbound")
            return stats is not None and stats[1] == workers

        await eventually(consuming, SETTLE, f"{workers} worker(s) consuming")
    return web


def nested_text(depth: int, leaf: str = "1") -> str:
    """JSON text of a list nested `depth` deep (written by hand: Python's json recurses)."""
    return "[" * depth + leaf + "]" * depth


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def send_text(ref: str, payload_text: str, event: str = "echo") -> str:
    return f'{{"type":"send","ref":"{ref}","event":"{event}","payload":{payload_text}}}'


def receipts(socket: LiveSocket) -> dict[Any, str]:
    return {f["ref"]: f["id"] for f in socket.others if f["type"] == "receipt"}


def errors(socket: LiveSocket) -> list[dict[str, Any]]:
    return [f for f in socket.others if f["type"] == "error"]


def error_for(socket: LiveSocket, ref: Any) -> dict[str, Any] | None:
    return next((f for f in errors(socket) if f.get("ref") == ref), None)


def echoes(socket: LiveSocket) -> dict[str, Any]:
    """inbound id -> echoed data."""
    return {
        m["payload"]["inbound"]: m["payload"]["data"] for m in socket.messages if m.get("event") == "echo"
    }


async def pong(socket: LiveSocket) -> None:
    answer = await socket.request({"type": "ping"}, "pong", timeout=SETTLE)
    assert answer == {"type": "pong"}, answer
    assert socket.closed_code is None


async def echo_stream(socket: LiveSocket, count: int, prefix: str = "good") -> dict[str, str]:
    """Send `count` echo frames at once; wait for every receipt and echo; ref -> inbound id."""
    refs = [f"{prefix}-{n}" for n in range(count)]
    for n, ref in enumerate(refs):
        await socket.send({"type": "send", "ref": ref, "event": "echo", "payload": {"n": n}})
    await socket.wait_for(
        lambda s: set(refs) <= set(receipts(s)) or any(error_for(s, r) for r in refs),
        SETTLE,
        what=f"{count} receipts",
    )
    assert [error_for(socket, r) for r in refs if error_for(socket, r)] == []
    ids = {ref: receipts(socket)[ref] for ref in refs}
    await socket.wait_for(lambda s: set(ids.values()) <= set(echoes(s)), SETTLE, what=f"{count} echoes")
    assert {ids[ref]: echoes(socket)[ids[ref]] for ref in refs} == {
        ids[ref]: {"n": n} for n, ref in enumerate(refs)
    }
    return ids


def metric(text: str, name: str, instance: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("instance") == instance:
                return sample.value
    raise KeyError(name)


async def read_metric(http: httpx.AsyncClient, web: Proc, name: str) -> float:
    return metric((await http.get(f"{web.url}/metrics")).text, name, web.name)


async def publish_raw(
    bodies: list[bytes], *, routing_key: str = "", exchange: str | None = None, persistent: bool = True
) -> None:
    """Publish bodies as any AMQP client could (confirmed): to the default exchange or `exchange`."""
    connection = await aio_pika.connect(settings.AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = (
            channel.default_exchange
            if exchange is None
            else await channel.get_exchange(exchange, ensure=True)
        )
        mode = aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        for body in bodies:
            await target.publish(
                aio_pika.Message(body, content_type="application/json", delivery_mode=mode),
                routing_key=routing_key,
            )
    finally:
        await connection.close()


async def drain_queue(name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message of a queue (it is this test's own)."""
    connection = await aio_pika.connect(settings.AMQP_URL)
    taken = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        while (message := await queue.get(no_ack=True, fail=False, timeout=10)) is not None:
            taken.append(message)
    finally:
        await connection.close()
    return taken


async def queue_empty(name: str) -> bool:
    stats = await queue_stats(name)
    return stats is not None and stats[0] == 0


# --- 1. deep payloads on the socket ----------------------------------------------------------


async def test_deep_payloads_on_the_socket_are_refused_and_others_keep_flowing(cluster, users):
    web = await start(cluster)
    async with httpx.AsyncClient(timeout=30) as http:
        carol = await open_socket(http, web, users["carol"])
        bob = await open_socket(http, web, users["bob"])

    # 64 deep is the limit (CONTRACT §1): queued and echoed, intact.
    answer = await carol.request(send_text("d64", nested_text(64)), "receipt", timeout=SETTLE)
    assert answer["type"] == "receipt" and answer["ref"] == "d64", answer
    await carol.wait_for(lambda s: answer["id"] in echoes(s), SETTLE, what="the 64-deep echo")
    assert echoes(carol)[answer["id"]] == nested(64)

    answer = await carol.request(send_text("d65", nested_text(65)), "receipt", timeout=SETTLE)
    assert (answer["type"], answer.get("code"), answer.get("ref")) == ("error", "invalid", "d65"), answer

    async def hostile() -> None:
        for depth in DEEP:
            ref = f"d{depth}"
            answer = await carol.request(send_text(ref, nested_text(depth)), "receipt", timeout=SETTLE)
            assert answer["type"] == "error", (depth, answer)
            # `invalid` with the ref; `bad_json` only where the JSON parser itself gave up.
            assert (answer["code"], answer["ref"]) in {("invalid", ref), ("bad_json", None)}, (depth, answer)

    await asyncio.gather(hostile(), echo_stream(bob, 20))

    # The sender's socket is still open and answering; nothing it was refused was queued.
    await pong(carol)
    await pong(bob)
    queued = await db(
        lambda: sorted(InboundFrame.objects.filter(ref__startswith="d").values_list("ref", flat=True))
    )()
    assert queued == ["d64"]
    await carol.close()
    await bob.close()


# --- 2. deep and unencodable payloads on the API ----------------------------------------------


async def test_deep_and_unencodable_payloads_on_the_api_are_400_never_500(cluster, users):
    web = await start(cluster, workers=0)
    alice = users["alice"]
    url = f"{web.url}/api/v1/messages/"
    headers = alice.headers | {"Content-Type": "application/json"}

    async def raw(http: httpx.AsyncClient, body: bytes) -> httpx.Response:
        return await http.post(url, content=body, headers=headers)

    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
        assert (await bob.request({"type": "subscribe", "topic": "t"}, "subscribed"))["type"] == "subscribed"

        ok = await raw(http, b'{"topic":"t","payload":' + nested_text(64).encode() + b"}")
        assert ok.status_code == 202, ok.text
        deep_id = ok.json()["id"]

        answers: dict[str, httpx.Response] = {}
        for depth in (65, 255, 270, 2000):
            answers[f"{depth} deep"] = await raw(
                http, b'{"topic":"t","payload":' + nested_text(depth).encode() + b"}"
            )
        answers["2**64"] = await post_message(http, web, alice, {"topic": "t", "payload": 2**64})
        answers["-2**63-1"] = await post_message(http, web, alice, {"topic": "t", "payload": -(2**63) - 1})
        answers["escaped lone surrogate"] = await raw(http, b'{"topic":"t","payload":"\\ud800"}')
        answers["raw lone surrogate"] = await raw(http, b'{"topic":"t","payload":"\xed\xa0\x80"}')
        answers["U+0000"] = await raw(http, b'{"topic":"t","payload":{"k":"a\\u0000b"}}')
        statuses = {what: response.status_code for what, response in answers.items()}
        assert statuses == dict.fromkeys(answers, 400), {
            w: (r.status_code, r.text[:200]) for w, r in answers.items()
        }
        assert "payload" in answers["65 deep"].json(), answers["65 deep"].text
        assert "payload" in answers["2**64"].json(), answers["2**64"].text

        # The instance carries on: a normal publish right after is accepted and delivered.
        after = await publish(http, web, alice, {"topic": "t", "event": "after", "payload": {"ok": True}})
        await bob.wait_for(
            lambda s: any(m["id"] == after["id"] for m in s.messages), SETTLE, what="the message after"
        )
        assert [m["id"] for m in bob.messages] == [deep_id, after["id"]]
        assert bob.messages[0]["payload"] == nested(64)
        assert await db(lambda: Message.objects.count())() == 2, "a refused request left a record"
        await bob.close()


async def test_api_values_at_the_edges_of_json_parsers_are_refused_not_altered(cluster, users):
    """Numbers Python's parser turns into infinity, and strings PostgreSQL cannot hold, in
    every field: a 400, never a 500, and never stored as something else than was sent."""
    web = await start(cluster, workers=0)
    url = f"{web.url}/api/v1/messages/"
    headers = users["alice"].headers | {"Content-Type": "application/json"}
    bodies = {
        "payload 1e400": b'{"topic":"t","payload":1e400}',
        "payload -1e400": b'{"topic":"t","payload":{"x":[-1e400]}}',
        "payload NaN": b'{"topic":"t","payload":NaN}',
        "user lone surrogate": b'{"user":"\\ud800","payload":1}',
        "user U+0000": b'{"user":"bo\\u0000b","payload":1}',
        "topic U+0000": b'{"topic":"t\\u0000","payload":1}',
        "event lone surrogate": b'{"topic":"t","event":"\\udfff","payload":1}',
    }
    async with httpx.AsyncClient(timeout=30) as http:
        answers = {what: await http.post(url, content=body, headers=headers) for what, body in bodies.items()}
        assert {w: r.status_code for w, r in answers.items()} == dict.fromkeys(bodies, 400), {
            w: (r.status_code, r.text[:200]) for w, r in answers.items()
        }
        assert (await http.get(f"{web.url}/readyz")).status_code == 200
    assert await db(lambda: list(Message.objects.values_list("payload", flat=True)))() == []


# --- 3. frames that used to crash a consumer --------------------------------------------------

CRASHERS: list[tuple[str, str]] = [
    # (frame text, expected error code); each frame has its own ref where it can carry one
    (send_text("c1", nested_text(700)), "invalid"),
    ('{"type":"subscribe","ref":"c2","topic":{"a":1}}', "invalid"),
    ('{"type":"subscribe","ref":"c3","topic":["x"]}', "invalid"),
    ('{"type":"unsubscribe","ref":"c4","topic":null}', "invalid"),
    ('{"type":"ack","ref":"c5","id":{"x":1}}', "invalid"),
    ('{"type":"send","ref":"c6","event":["echo"],"payload":1}', "invalid"),
    ('{"type":"send","ref":"c7","event":"chat.message","payload":{"room":{"a":1},"text":"x"}}', "invalid"),
    ('{"type":"send","ref":"c8","event":"diag.sleep","payload":{"ms":"x"}}', "invalid"),
    ('{"type":{"a":1},"ref":"c9"}', "invalid"),
    ('{"type":"send","ref":"c10","event":"echo","payload":"\\u0000"}', "invalid"),
    ('{"type":"send","ref":"c11","event":"echo","payload":1e400}', "bad_json"),
    ('{"type":"send","ref":"c12","event":"echo","payload":"\\ud800"}', "bad_json"),
    ("[]", "invalid"),
    ('"ping"', "invalid"),
    ('{"type":"ping","ref":{"a":1}}', "invalid"),
    ("{" * 2000, "bad_json"),
]


async def test_sockets_whose_frames_raise_leave_no_connection_behind(cluster, users):
    web = await start(cluster, workers=0)
    async with httpx.AsyncClient(timeout=30) as http:
        control = await open_socket(http, web, users["bob"])
        before = await read_metric(http, web, "rt_connections")
        assert before == 1
        hostile = [await open_socket(http, web, users["carol"]) for _ in range(10)]
        assert await read_metric(http, web, "rt_connections") == before + 10

        for socket in hostile:
            for text, _ in CRASHERS:
                await socket.send(text)
            await socket.send({"type": "ping"})
        for socket in hostile:
            await socket.wait_for(
                lambda s: len(errors(s)) >= len(CRASHERS) and any(f["type"] == "pong" for f in s.others),
                SETTLE,
                what="an answer to every frame",
            )
            assert socket.closed_code is None, "a hostile frame closed its socket"
            assert [e["code"] for e in errors(socket)] == [code for _, code in CRASHERS], errors(socket)

        # Half close cleanly, half vanish without a closing handshake (a dropped TCP connection).
        for socket in hostile[:5]:
            await socket.close()
        for socket in hostile[5:]:
            socket.ws.transport.abort()
        await eventually(
            lambda: _metric_is(http, web, "rt_connections", before), SETTLE, "rt_connections back to 1"
        )
        # The survivor still gets its messages.
        note = await publish(http, web, users["alice"], {"user": "bob", "event": "still-here"})
        await control.wait_for(
            lambda s: any(m["id"] == note["id"] for m in s.messages), SETTLE, what="a message"
        )
        await pong(control)
        await control.close()
        for socket in hostile[5:]:
            if socket.reader is not None:
                await asyncio.wait_for(socket.reader, 10)


async def _metric_is(http: httpx.AsyncClient, web: Proc, name: str, value: float) -> bool:
    return await read_metric(http, web, name) == value


# --- 4. malformed messages on the deployment's own queues and exchanges ------------------------


async def test_malformed_messages_on_the_inbound_queue_are_dead_lettered_and_nothing_stalls(cluster, users):
    web = await start(cluster)
    ns = cluster.namespace
    bob_id = await db(lambda: User.objects.get(username="bob").pk)()
    unknown_user, nul_payload, deep_payload, huge_user = (str(uuid.uuid4()) for _ in range(4))
    unreadable = [
        b'{"id": "nope"}',
        b'{"frames": [{"id": "x"}]}',
        b"not json",
        b"[]",
        b'{"frames": []}',
        b'{"id": "'
        + str(uuid.uuid4()).encode()
        + b'", "user_id": "'
        + str(bob_id).encode()
        + b'", "event": "echo"}',
        b'{"id": "' + str(uuid.uuid4()).encode() + b'", "event": ""}',
    ]
    readable = {
        unknown_user: {"id": unknown_user, "user_id": 999999, "event": "echo", "payload": 1},
        nul_payload: {"id": nul_payload, "user_id": bob_id, "event": "echo", "payload": "a\u0000b"},
        deep_payload: {"id": deep_payload, "user_id": bob_id, "event": "echo", "payload": nested(300)},
        huge_user: {"id": huge_user, "user_id": 2**63, "event": "echo", "payload": 2},
    }
    readable_bodies = [
        # Written by hand where Python's json would recurse or refuse.
        json.dumps(readable[unknown_user]).encode(),
        json.dumps(readable[nul_payload]).encode(),
        (
            f'{{"id":"{deep_payload}","user_id":{bob_id},"event":"echo","payload":{nested_text(300)}}}'
        ).encode(),
        json.dumps(readable[huge_user]).encode(),
    ]
    await publish_raw(unreadable + readable_bodies, routing_key=f"{ns}.inbound")

    # Meanwhile a real socket's echoes work.
    async with httpx.AsyncClient(timeout=30) as http:
        alice = await open_socket(http, web, users["alice"])
    await echo_stream(alice, 10)

    # Every one of them is put aside: the unreadable ones in the dead-letter queue with the
    # reason, the readable ones processed or dead (in the database, or dead-lettered).
    dead: list[aio_pika.abc.AbstractIncomingMessage] = []

    def dead_ids() -> set[str]:
        ids = set()
        for message in dead:
            try:
                ids.add(json.loads(message.body).get("id"))
            except (ValueError, AttributeError, RecursionError):
                pass
        return ids

    async def settled(frame_id: str) -> bool:
        status = await db(
            lambda: InboundFrame.objects.filter(id=frame_id).values_list("status", flat=True).first()
        )()
        return frame_id in dead_ids() or status in (InboundFrame.Status.PROCESSED, InboundFrame.Status.DEAD)

    async def all_put_aside() -> bool:
        dead.extend(await drain_queue(f"{ns}.inbound.dead"))
        bodies = [message.body for message in dead]
        return all(body in bodies for body in unreadable) and all([await settled(i) for i in readable])

    try:
        await eventually(all_put_aside, SETTLE, "every malformed message settled")
    except TimeoutError:
        stuck = {i: body for i, body in readable.items() if not await settled(i)}
        missing = [body for body in unreadable if body not in [m.body for m in dead]]
        raise AssertionError(f"not dead-lettered: {missing}; stuck: {stuck!s:.500}") from None

    bodies = [message.body for message in dead]
    for body in unreadable:
        assert bodies.count(body) == 1, (body, bodies)
    for message in dead:
        assert (message.headers or {}).get("x-rt-error"), (message.body[:80], message.headers)

    # The inbound queue is empty and nothing is held unacked: a worker that stops hands back
    # whatever it still held, so after the stop the queue shows it.
    await eventually(lambda: queue_empty(f"{ns}.inbound"), SETTLE, f"{ns}.inbound empty")
    for worker in cluster.workers:
        assert await asyncio.to_thread(worker.stop) == 0
    assert await queue_stats(f"{ns}.inbound") == (0, 0), "the worker held messages unacked"
    assert await queue_stats(f"{ns}.inbound.dead") == (0, 0), "dead letters after all settled"
    await alice.close()


async def test_malformed_messages_on_the_broadcast_exchange_are_dropped_and_delivery_goes_on(cluster, users):
    web = await start(cluster, workers=0)
    ns = cluster.namespace
    instance_queue = f"{ns}.instance.{web.name}"
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
        assert (await bob.request({"type": "subscribe", "topic": "t"}, "subscribed"))["type"] == "subscribed"
        malformed_before = await read_metric(http, web, "rt_broker_messages_malformed_total")

        some_id = str(uuid.uuid4())
        bodies = [b'{"id": [1], "topic": ["x"]}'] * 300 + [
            b'{"messages": "x"}',
            b"not json",
            b"[]",
            b'{"messages": []}',
            b'{"id": "' + some_id.encode() + b'", "topic": ["t"]}',
            b'{"id": "' + str(uuid.uuid4()).encode() + b'", "topic": {"a": 1}}',
            b'{"id": "' + str(uuid.uuid4()).encode() + b'", "user_id": [1]}',
            # Parsed (orjson reads 1024 deep) but not encodable as a frame (over 255 deep).
            b'{"id": "'
            + str(uuid.uuid4()).encode()
            + b'", "topic": "t", "payload": '
            + nested_text(300).encode()
            + b"}",
            b'{"id": "'
            + str(uuid.uuid4()).encode()
            + b'", "broadcast": true, "payload": '
            + nested_text(300).encode()
            + b"}",
        ]
        await publish_raw(bodies, exchange=f"{ns}.broadcast")

        # A normal publish after them still reaches the subscribed socket, and the queue drains.
        after = await publish(http, web, users["alice"], {"topic": "t", "event": "after", "payload": 1})
        await bob.wait_for(
            lambda s: any(m["id"] == after["id"] for m in s.messages), SETTLE, what="the message after"
        )
        assert [m["id"] for m in bob.messages] == [after["id"]], bob.messages[:3]
        await eventually(lambda: queue_empty(instance_queue), SETTLE, f"{instance_queue} drained")
        assert (await http.get(f"{web.url}/readyz")).status_code == 200
        # Counted: at least those no reader could take for a message (no id, no object, no list).
        malformed = await read_metric(http, web, "rt_broker_messages_malformed_total") - malformed_before
        assert malformed >= 304, f"{malformed} of {len(bodies)} counted as malformed"
        await pong(bob)
        await bob.close()


async def test_one_bad_item_in_a_broker_message_fails_alone(cluster, users):
    """DESIGN "Failure isolation": several items travelling together, one bad: the others live.

    On `<ns>.inbound` a message of two frames, one unreadable, and on `<ns>.broadcast` a message
    of two messages, one unreadable: the good frame is processed (echoed), the good message
    delivered; the bad frame is dead-lettered with the reason.
    """
    web = await start(cluster)
    ns = cluster.namespace
    bob_id = await db(lambda: User.objects.get(username="bob").pk)()
    good_frame = str(uuid.uuid4())
    good_message = str(uuid.uuid4())
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
    frames = {
        "frames": [{"id": good_frame, "user_id": bob_id, "event": "echo", "payload": "mixed"}, {"id": "x"}]
    }
    await publish_raw([json.dumps(frames).encode()], routing_key=f"{ns}.inbound")
    messages = {"messages": [{"id": good_message, "user_id": bob_id, "event": "mixed", "payload": 1}, "x"]}
    await publish_raw([json.dumps(messages).encode()], exchange=f"{ns}.broadcast")
    await echo_stream(bob, 3)  # later traffic flows either way

    await eventually(lambda: queue_empty(f"{ns}.inbound"), SETTLE, f"{ns}.inbound empty")
    problems = []
    if good_frame not in echoes(bob):
        status = await db(
            lambda: InboundFrame.objects.filter(id=good_frame).values_list("status", flat=True).first()
        )()
        problems.append(
            f"the good frame of a message with an unreadable one was not processed (record: {status})"
        )
    if not any(m["id"] == good_message for m in bob.messages):
        problems.append("the good message of a broadcast message with an unreadable item was not delivered")
    assert problems == []
    await bob.close()


async def test_forged_stream_positions_on_the_broadcast_exchange_stall_nobody(cluster, users):
    """Messages on `<ns>.broadcast` that claim impossible places in a stream (a seq far ahead
    in the stream's own epoch, seqs that are no numbers, no stream): every real message
    published after them still reaches its socket, for longer than any gap wait."""
    web = await start(cluster, workers=0)
    ns = cluster.namespace
    bob_id = await db(lambda: User.objects.get(username="bob").pk)()
    user_stream = f"user:{bob_id}"  # the broker's name of bob's stream (a socket sees `user`)
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
        await pong(bob)  # not resuming: bob's own streams are live from here
        alice = users["alice"]
        first_user = await publish(http, web, alice, {"user": "bob", "event": "first"})
        first_all = await publish(http, web, alice, {"broadcast": True, "event": "first"})
        await bob.wait_for(lambda s: len(s.messages) == 2, SETTLE, what="the first two messages")
        by_id = {m["id"]: m for m in bob.messages}
        mine, everyone = by_id[first_user["id"]], by_id[first_all["id"]]

        def forged(**fields: Any) -> bytes:
            body = {"id": str(uuid.uuid4()), "event": "forged", "payload": 1} | fields
            return json.dumps(body).encode()

        far = 10**9
        await publish_raw(
            [
                forged(
                    stream=user_stream,
                    seq=(mine.get("seq") or 0) + far,
                    epoch=mine.get("epoch"),
                    user_id=bob_id,
                ),
                forged(
                    stream="broadcast",
                    seq=(everyone.get("seq") or 0) + far,
                    epoch=everyone.get("epoch"),
                    broadcast=True,
                ),
                forged(stream=user_stream, seq="7", epoch=mine.get("epoch"), user_id=bob_id),
                forged(stream=user_stream, seq=-1, epoch=mine.get("epoch"), user_id=bob_id),
                forged(stream=user_stream, seq=True, epoch=mine.get("epoch"), user_id=bob_id),
                b'{"id":"%s","stream":"broadcast","seq":1e300,"broadcast":true}' % str(uuid.uuid4()).encode(),
                forged(stream=["x"], seq=1, user_id=bob_id),
                forged(stream=None, seq=1, broadcast=True),
            ],
            exchange=f"{ns}.broadcast",
        )

        # Real messages keep arriving, each within the deadline, for several gap waits.
        loop = asyncio.get_running_loop()
        until = loop.time() + 3.0
        sent = []
        while loop.time() < until or len(sent) < 4:
            body = {"user": "bob"} if len(sent) % 2 == 0 else {"broadcast": True}
            record = await publish(http, web, alice, body | {"event": "real", "payload": len(sent)})
            sent.append(record["id"])
            await bob.wait_for(
                lambda s, i=record["id"]: any(m["id"] == i for m in s.messages),
                10,
                what=f"real message {len(sent)} after the forged ones",
            )
        real = [m for m in bob.messages if m.get("event") in ("first", "real")]
        assert [m["id"] for m in real][2:] == sent
        for stream in {m.get("stream") for m in real}:
            seqs = [m.get("seq") for m in real if m.get("stream") == stream]
            if None not in seqs:
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (stream, seqs)
        await pong(bob)
        await bob.close()


# --- 5. refused frames interleaved with good ones ---------------------------------------------


async def test_refused_frames_interleaved_with_good_ones_fail_alone(cluster, users):
    web = await start(cluster)
    async with httpx.AsyncClient(timeout=30) as http:
        alice = await open_socket(http, web, users["alice"])
        bob = await open_socket(http, web, users["bob"])

    deep_refs = [f"deep-{n}" for n in range(10)]
    big_refs = [f"big-{n}" for n in range(10)]
    good_refs = [f"good-{n}" for n in range(20)]
    # Python's json writes 2**64 as it is; orjson (the server's parser) reads it as a float.
    big_int = "18446744073709551617"

    async def good() -> None:
        for n, ref in enumerate(good_refs):
            await alice.send({"type": "send", "ref": ref, "event": "echo", "payload": {"n": n}})
            await asyncio.sleep(0)

    async def bad() -> None:
        for deep, big in zip(deep_refs, big_refs, strict=True):
            await bob.send(send_text(deep, nested_text(65)))
            await bob.send(send_text(big, big_int))
            await asyncio.sleep(0)

    await asyncio.gather(good(), bad())
    await alice.wait_for(lambda s: len(receipts(s)) + len(errors(s)) >= 20, SETTLE, what="20 answers")
    assert errors(alice) == []
    ids = receipts(alice)
    assert set(ids) == set(good_refs)
    await alice.wait_for(lambda s: set(ids.values()) <= set(echoes(s)), SETTLE, what="20 echoes")
    assert {echoes(alice)[ids[ref]]["n"] for ref in good_refs} == set(range(20))

    await bob.wait_for(lambda s: len(receipts(s)) + len(errors(s)) >= 20, SETTLE, what="bob's 20 answers")
    assert {ref: error_for(bob, ref)["code"] for ref in deep_refs if error_for(bob, ref)} == dict.fromkeys(
        deep_refs, "invalid"
    )
    await pong(bob)
    # An integer past 64 bits is refused at the API (400); the socket must not take it either,
    # least of all as a different number (CONTRACT §3: "API and socket alike").
    receipted = {ref: receipts(bob)[ref] for ref in big_refs if ref in receipts(bob)}
    if receipted:  # for the report: what became of them
        try:
            await bob.wait_for(lambda s: set(receipted.values()) <= set(echoes(s)), 10, what="echoes")
        except TimeoutError:
            pass
    outcome = {
        ref: (error_for(bob, ref) or {}).get("code")
        or f"receipt, then {echoes(bob).get(receipted[ref], 'no echo')!r} ({await _status(receipted[ref])})"
        for ref in big_refs
    }
    assert outcome == dict.fromkeys(big_refs, "invalid"), outcome
    await alice.close()
    await bob.close()


async def _status(frame_id: str) -> str | None:
    return await db(
        lambda: InboundFrame.objects.filter(id=frame_id).values_list("status", flat=True).first()
    )()


async def test_large_numbers_in_a_socket_payload_are_echoed_not_dead_lettered(cluster, users):
    """Valid JSON numbers the socket accepts must survive the way to the worker and back:
    PostgreSQL's jsonb returns a float such as 1e20 as the integer 100000000000000000000."""
    web = await start(cluster)
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
    payloads = {
        "u64-max": "18446744073709551615",
        "i64-min": "-9223372036854775808",
        "1e20": "1e20",
        "float-in-object": '{"x":-1.5e300}',
        "1.5": "1.5",
    }
    for ref, text in payloads.items():
        await bob.send(send_text(ref, text))
    await bob.wait_for(lambda s: len(receipts(s)) + len(errors(s)) >= len(payloads), SETTLE, what="answers")
    assert errors(bob) == []
    ids = receipts(bob)
    try:
        await bob.wait_for(lambda s: set(ids.values()) <= set(echoes(s)), 20, what="echoes")
    except TimeoutError:
        pass
    outcome = {
        ref: echoes(bob)[ids[ref]] if ids[ref] in echoes(bob) else f"no echo ({await _status(ids[ref])})"
        for ref in payloads
    }
    assert outcome == {ref: json.loads(text) for ref, text in payloads.items()}, outcome
    await bob.close()


# --- 6. the subscription cap -------------------------------------------------------------------


async def test_the_subscription_cap(cluster, users):
    web = await start(cluster, workers=0, RT_MAX_SUBSCRIPTIONS="3")
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])

        async def subscribe(topic: str, ref: str) -> dict[str, Any]:
            return await bob.request({"type": "subscribe", "topic": topic, "ref": ref}, "subscribed")

        for topic in ("a", "b", "c"):
            assert (await subscribe(topic, topic))["type"] == "subscribed"
        refused = await subscribe("d", "fourth")
        assert (refused["type"], refused.get("code"), refused.get("ref")) == ("error", "too_many", "fourth")
        assert (await subscribe("b", "again"))["type"] == "subscribed", "re-subscribing counts once"
        assert (await subscribe("d", "fourth-again")).get("code") == "too_many"
        left = await bob.request({"type": "unsubscribe", "topic": "a"}, "unsubscribed")
        assert left == {"type": "unsubscribed", "topic": "a"}
        assert (await subscribe("d", "now"))["type"] == "subscribed"
        assert (await subscribe("e", "fifth")).get("code") == "too_many"

        # The refused topic was not subscribed, the others are: messages published one after
        # another arrive in that order, so once the marker is there, the topics' are too.
        for topic in ("a", "b", "c", "d", "e"):
            await publish(http, web, users["alice"], {"topic": topic, "event": topic})
        note = await publish(http, web, users["alice"], {"user": "bob", "event": "marker"})
        await bob.wait_for(
            lambda s: any(m["id"] == note["id"] for m in s.messages), SETTLE, what="the marker"
        )
        assert sorted(m["topic"] for m in bob.messages if m["topic"]) == ["b", "c", "d"]
        await bob.close()


# --- 7. ref length ---------------------------------------------------------------------------


async def test_a_ref_longer_than_100_characters_is_invalid_on_any_frame(cluster, users):
    web = await start(cluster)
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
    long_ref, ok_ref = "r" * 101, "r" * 100

    for frame in (
        {"type": "ping", "ref": long_ref},
        {"type": "subscribe", "topic": "t", "ref": long_ref},
        {"type": "send", "event": "echo", "payload": 1, "ref": long_ref},
        {"type": "ack", "id": str(uuid.uuid4()), "ref": long_ref},
    ):
        answer = await bob.request(frame, "never")
        assert (answer["type"], answer["code"], answer["ref"]) == ("error", "invalid", None), (frame, answer)

    assert await bob.request({"type": "ping", "ref": ok_ref}, "pong") == {"type": "pong"}
    assert (await bob.request({"type": "subscribe", "topic": "t", "ref": ok_ref}, "subscribed"))[
        "type"
    ] == "subscribed"
    receipt = await bob.request(
        {"type": "send", "event": "echo", "payload": 1, "ref": ok_ref}, "receipt", SETTLE
    )
    assert (receipt["type"], receipt["ref"]) == ("receipt", ok_ref), receipt
    await bob.wait_for(lambda s: receipt["id"] in echoes(s), SETTLE, what="the echo")
    # Nothing was queued for the refused ones.
    assert await db(lambda: InboundFrame.objects.count())() == 1
    await bob.close()


# --- 8. binary frames and the rate limit -----------------------------------------------------


async def test_binary_frames_count_against_the_rate_limit(cluster, users):
    web = await start(cluster, workers=0, RT_SOCKET_RATE="5")
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
    for n in range(30):
        await bob.ws.send(b"\x00binary" + bytes([n]))
    await bob.wait_for(lambda s: len(errors(s)) >= 30, SETTLE, what="an answer to each binary frame")
    codes = [e["code"] for e in errors(bob)]
    assert "rate_limited" in codes, codes
    # The burst (2 x 5) is answered `invalid` (binary is not JSON text), then the rate refuses.
    assert set(codes) == {"invalid", "rate_limited"} and codes[:10] == ["invalid"] * 10, codes
    assert bob.closed_code is None
    await bob.close()


# --- 9. a restricted chat room -----------------------------------------------------------------


async def test_chat_to_a_restricted_room_needs_membership(cluster, users):
    assert "chat.message" in settings.RT_INBOUND_HANDLERS

    def restrict() -> ApiUser:
        insiders = Group.objects.create(name="insiders")
        Topic.objects.create(name="chat.secret").groups.add(insiders)
        return make_user("insider", groups=[insiders])

    member = await db(restrict)()
    web = await start(cluster)
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
        inside = await open_socket(http, web, member)

    chat = {"type": "send", "event": "chat.message", "payload": {"room": "secret", "text": "hi"}}
    refused = await bob.request(chat | {"ref": "b1"}, "receipt", SETTLE)
    assert (refused["type"], refused.get("code"), refused.get("ref")) == ("error", "forbidden", "b1"), refused
    refused = await bob.request({"type": "subscribe", "topic": "chat.secret", "ref": "b2"}, "subscribed")
    assert (refused["type"], refused.get("code")) == ("error", "forbidden"), refused

    assert (await inside.request({"type": "subscribe", "topic": "chat.secret"}, "subscribed"))[
        "type"
    ] == "subscribed"
    receipt = await inside.request(chat | {"ref": "m1"}, "receipt", SETTLE)
    assert (receipt["type"], receipt["ref"]) == ("receipt", "m1"), receipt
    await inside.wait_for(
        lambda s: any(
            m["event"] == "chat.message" and m["payload"]["inbound"] == receipt["id"] for m in s.messages
        ),
        SETTLE,
        what="the chat line",
    )
    line = next(m for m in inside.messages if m["event"] == "chat.message")
    assert (line["topic"], line["payload"]["text"], line["payload"]["author"]) == (
        "chat.secret",
        "hi",
        "insider",
    )
    assert await db(lambda: InboundFrame.objects.filter(user__username="bob").count())() == 0
    await pong(bob)
    await bob.close()
    await inside.close()
