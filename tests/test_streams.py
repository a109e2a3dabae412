"""Streams and recovery across real processes (CONTRACT §4 "Streams and recovery", §3 history, §5.5).

Every message belongs to one stream (`topic:T`, the recipient's `user` stream, `broadcast`),
numbered `seq` 1, 2, 3, ... with an `epoch`; a socket that reconnects to any instance sends
`subscribe` with `since` and `resume`, and gets the answer first, then what it missed in order
and once, then the live messages with no gap or duplicate at the seam. The helpers here are
shared with tests/test_recovery_faults.py.
"""

import asyncio
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from channels.db import database_sync_to_async
from django.contrib.auth.models import Group

from notifications.models import Topic
from tests.support.clients import ApiUser, LiveSocket, accepted, post_message, ticket
from tests.support.waiting import eventually

# Seconds a recovery (replay plus live messages) may take on two shared cores.
RECOVERY_TIMEOUT = 60.0
OWN_STREAMS = ("user", "broadcast")


# --- sockets that keep the order of every frame ------------------------------------------------


@dataclass
class OrderedSocket(LiveSocket):
    """A LiveSocket that also keeps every frame in arrival order, whatever its type, so a test can
    tell whether an answer came before the messages of its stream."""

    frames: list[dict[str, Any]] = field(default_factory=list)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                self.frames.append(frame)
                (self.messages if frame.get("type") == "message" else self.others).append(frame)
                self.changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed_code = self.ws.close_code
            self.changed.set()

    def of(self, stream: str) -> list[dict[str, Any]]:
        """The messages of one stream, in arrival order."""
        return [m for m in self.messages if m.get("stream") == stream]

    def seqs(self, stream: str) -> list[int]:
        return [m.get("seq") for m in self.of(stream)]

    def reached(self, stream: str, seq: int) -> bool:
        return any(isinstance(s, int) and s >= seq for s in self.seqs(stream))


async def open_ordered(http: httpx.AsyncClient, server: Any, user: ApiUser) -> OrderedSocket:
    return await OrderedSocket.open(f"{server.ws_url}?ticket={await ticket(http, server.url, user)}")


def describe(seqs: list[Any], expected: list[int]) -> str:
    """What is wrong with a stream's seqs, for an assertion message."""
    counts = Counter(seqs)
    missing = sorted(set(expected) - set(counts))
    duplicated = sorted(s for s, n in counts.items() if n > 1)
    extra = sorted((s for s in counts if s not in set(expected)), key=str)
    inversions = [
        (a, b)
        for a, b in zip(seqs, seqs[1:], strict=False)
        if not (isinstance(a, int) and isinstance(b, int) and a < b)
    ]
    return (
        f"got {len(seqs)} seqs (first {seqs[:5]}, last {seqs[-5:]}), expected {len(expected)} "
        f"({expected[:1]}..{expected[-1:]}); missing {missing[:20]}, duplicated {duplicated[:20]}, "
        f"unexpected {extra[:20]}, out of order at {inversions[:10]}"
    )


# --- a listener's three streams and publishing to them -----------------------------------------


@dataclass
class Streams:
    """The three streams one listener sees: a topic of this test, its user stream, broadcasts."""

    topic: str
    listener: str

    @classmethod
    def new(cls, listener: str = "bob") -> "Streams":
        return cls(topic=f"t-{uuid.uuid4().hex[:8]}", listener=listener)

    @property
    def topic_stream(self) -> str:
        return f"topic:{self.topic}"

    @property
    def names(self) -> tuple[str, str, str]:
        return (self.topic_stream, "user", "broadcast")

    def body(self, stream: str, tag: str, n: int) -> dict[str, Any]:
        payload = {"tag": tag, "n": n}
        if stream == "user":
            return {"user": self.listener, "event": tag, "payload": payload}
        if stream == "broadcast":
            return {"broadcast": True, "event": tag, "payload": payload}
        return {"topic": self.topic, "event": tag, "payload": payload}


Records = dict[str, list[dict[str, Any]]]


def numbered(record: dict[str, Any], stream: str) -> dict[str, Any]:
    """A 202 record: it carries its stream and an integer seq (CONTRACT §3, §4)."""
    assert record.get("stream") == stream and isinstance(record.get("seq"), int), (
        f"a 202 record must carry stream {stream!r} and its seq: {record}"
    )
    return record


async def publish_rounds(
    http: httpx.AsyncClient,
    server: Any,
    publisher: ApiUser,
    streams: Streams,
    rounds: int,
    tag: str,
    *,
    tolerate_503: bool = False,
) -> Records:
    """`rounds` rounds of one message per stream, each POST after the previous answer; the 202
    records by stream (with `tolerate_503`, a 503 is allowed and publishes nothing)."""
    records: Records = {name: [] for name in streams.names}
    for n in range(rounds):
        for name in streams.names:
            response = await post_message(http, server, publisher, streams.body(name, tag, n))
            if tolerate_503 and response.status_code == 503:
                continue
            records[name].append(numbered(accepted(response), name))
    return records


def merge(*parts: Records) -> Records:
    out: Records = {}
    for part in parts:
        for name, records in part.items():
            out.setdefault(name, []).extend(records)
    return out


def last_seq(records: Records, stream: str) -> int:
    return max(r["seq"] for r in records[stream])


# --- the recovery scenario, shared with tests/test_recovery_faults.py ---------------------------


async def subscribe(sock: LiveSocket, topic: str, since: dict[str, Any] | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "subscribe", "topic": topic}
    if since is not None:
        frame["since"] = since
    answer = await sock.request(frame, "subscribed", timeout=30)
    assert answer["type"] == "subscribed" and answer["topic"] == topic, answer
    return answer


async def listen_and_read(
    http: httpx.AsyncClient,
    listen_on: Any,
    publish_via: Any,
    users: dict[str, ApiUser],
    streams: Streams,
    rounds: int,
) -> tuple[OrderedSocket, Records]:
    """A socket of the listener on `listen_on`, subscribed to the topic, that has read the first
    `rounds` messages of each of its three streams (published through `publish_via`)."""
    sock = await open_ordered(http, listen_on, users[streams.listener])
    await subscribe(sock, streams.topic)
    records = await publish_rounds(http, publish_via, users["alice"], streams, rounds, "first")
    await sock.wait_for(
        lambda s: all(s.reached(name, last_seq(records, name)) for name in streams.names),
        timeout=RECOVERY_TIMEOUT,
        what="the first messages of each stream",
    )
    for name in streams.names:
        expected = sorted(r["seq"] for r in records[name])
        assert sock.seqs(name) == expected, f"{name}: {describe(sock.seqs(name), expected)}"
    assert sock.seqs(streams.topic_stream) == list(range(1, rounds + 1)), "a new topic numbers from 1"
    return sock, records


def position_of(sock: OrderedSocket, stream: str) -> dict[str, Any]:
    """The last seq and epoch the socket saw of a stream: what it sends as `since`."""
    messages = sock.of(stream)
    assert messages, f"the socket saw nothing of {stream}"
    epochs = {m.get("epoch") for m in messages}
    assert len(epochs) == 1 and isinstance(messages[-1]["epoch"], str), f"{stream}: epochs {epochs}"
    return {"seq": messages[-1]["seq"], "epoch": messages[-1]["epoch"]}


def seen_position(sock: OrderedSocket, streams: Streams) -> dict[str, dict[str, Any]]:
    """The last seq and epoch the socket saw of each of its three streams."""
    return {name: position_of(sock, name) for name in streams.names}


def assert_contiguous_from(sock: OrderedSocket, stream: str, first: int, last: int) -> None:
    expected = list(range(first, last + 1))
    got = sock.seqs(stream)
    assert got == expected, f"{stream}: {describe(got, expected)}"


async def recover(
    http: httpx.AsyncClient,
    server: Any,
    users: dict[str, ApiUser],
    streams: Streams,
    seen: dict[str, dict[str, Any]],
    missed: Records,
    live_rounds: int = 15,
) -> OrderedSocket:
    """Reconnect the listener to `server`, resume `user` and `broadcast` and subscribe the topic
    with `since` = what it saw, while a publisher keeps publishing to all three streams through
    `server`; assert, per stream: the answer (recovered) comes before any message of the stream,
    then every seq after `since` in order and once, then the live ones with no gap or duplicate."""
    # A broadcast marker through `server`, seen by a socket there: whatever broadcasts were
    # still queued for that instance are delivered before the listener connects, so no
    # earlier broadcast reaches its new socket as a live message before it could `resume`.
    probe = await open_ordered(http, server, users["staff"])
    flush = streams.body("broadcast", "flush", 0)
    marker = numbered(accepted(await post_message(http, server, users["alice"], flush)), "broadcast")
    missed = merge(missed, {"broadcast": [marker]})
    await probe.wait_for(
        lambda s: s.reached("broadcast", marker["seq"]), timeout=RECOVERY_TIMEOUT, what="the flush marker"
    )
    await probe.close()

    # Live publishers, one per stream, so that live messages meet the replay: the topic's starts
    # before the socket connects and keeps going through its `subscribe`; those of the socket's
    # own streams start as soon as the frames are sent (before that, the server could not know
    # the new socket is about to resume, and would rightly deliver them live).
    frames_sent, topic_started = asyncio.Event(), asyncio.Event()
    live: Records = {name: [] for name in streams.names}

    after: Counter[str] = Counter()

    async def pump(name: str) -> None:
        while after[name] < live_rounds:
            if name in OWN_STREAMS:
                await frames_sent.wait()
            counted = frames_sent.is_set()
            body = streams.body(name, "live", len(live[name]))
            after[name] += counted
            live[name].append(
                numbered(accepted(await post_message(http, server, users["alice"], body)), name)
            )
            topic_started.set()

    # The own streams' publishers start several at once, to be accepted while the server replays.
    pumps = [asyncio.create_task(pump(streams.topic_stream))] + [
        asyncio.create_task(pump(name)) for name in OWN_STREAMS for _ in range(3)
    ]
    try:
        await asyncio.wait_for(topic_started.wait(), 30)
        sock = await open_ordered(http, server, users[streams.listener])
        assert not sock.messages, f"nothing arrives before the socket asks: {sock.messages[:3]}"
        await sock.send({"type": "subscribe", "topic": streams.topic, "since": seen[streams.topic_stream]})
        for name in OWN_STREAMS:
            await sock.send({"type": "resume", "stream": name, "since": seen[name]})
        frames_sent.set()
        await asyncio.gather(*pumps)
    finally:
        for task in pumps:
            task.cancel()
    # One more round, once the live ones are accepted: anything duplicated arrives before it.
    end = await publish_rounds(http, server, users["alice"], streams, 1, "end")
    records = merge(missed, live, end)
    final = {name: last_seq(end, name) for name in streams.names}
    try:
        await sock.wait_for(
            lambda s: all(s.reached(name, final[name]) for name in streams.names),
            timeout=RECOVERY_TIMEOUT,
            what="every stream to recover and reach its last live message",
        )
    except TimeoutError as exc:
        progress = {
            name: describe(sock.seqs(name), list(range(seen[name]["seq"] + 1, final[name] + 1)))
            for name in streams.names
        }
        raise AssertionError(f"{exc}; answers {sock.others}; {progress}") from None

    for name in streams.names:
        answer_at = next(
            (
                i
                for i, f in enumerate(sock.frames)
                if (
                    name == streams.topic_stream
                    and f["type"] == "subscribed"
                    and f.get("topic") == streams.topic
                )
                or (name in OWN_STREAMS and f["type"] == "resumed" and f.get("stream") == name)
            ),
            None,
        )
        errors = [f for f in sock.others if f["type"] == "error"]
        assert answer_at is not None, f"no answer for {name}; errors {errors}"
        answer = sock.frames[answer_at]
        assert answer.get("recovered") is True, f"{name}: {answer}"
        assert answer.get("epoch") == seen[name]["epoch"], f"{name}: {answer} vs {seen[name]}"
        floor = max([seen[name]["seq"]] + [r["seq"] for r in missed.get(name, [])])
        assert isinstance(answer.get("seq"), int) and floor <= answer["seq"] <= final[name], (
            f"{name}: {answer}"
        )
        first_message_at = next(
            i for i, f in enumerate(sock.frames) if f["type"] == "message" and f.get("stream") == name
        )
        assert answer_at < first_message_at, (
            f"{name}: a message came before the answer: {sock.frames[first_message_at]} then {answer}"
        )
        assert_contiguous_from(sock, name, seen[name]["seq"] + 1, final[name])
        assert {m["epoch"] for m in sock.of(name)} == {seen[name]["epoch"]}, name
        before = sum(1 for r in live[name] if r["seq"] <= answer["seq"])
        print(f"{name}: {before} live messages numbered before the answer, {len(live[name]) - before} after")
        by_seq = {r["seq"]: r["id"] for r in records[name]}
        wrong = [(m["seq"], m["id"]) for m in sock.of(name) if by_seq.get(m["seq"], m["id"]) != m["id"]]
        assert not wrong, f"{name}: messages with another message's seq: {wrong[:5]}"
    missed_ids = {r["id"] for name in streams.names for r in missed.get(name, [])}
    assert missed_ids <= {m["id"] for m in sock.messages}, "every missed message replayed"
    return sock


# --- numbering --------------------------------------------------------------------------------


async def test_two_publishers_on_two_instances_number_a_topic_without_gap_duplicate_or_reorder(
    cluster, users
):
    web_a, web_b = cluster.add_web(), cluster.add_web()
    web_a.wait_ready()
    web_b.wait_ready()
    streams = Streams.new("bob")
    per_publisher = 100
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_ordered(http, web_a, users["bob"])
        carol = await open_ordered(http, web_b, users["carol"])
        for sock in (bob, carol):
            await subscribe(sock, streams.topic)

        async def publisher(server) -> list[dict[str, Any]]:
            """As fast as it can; every 20th round also a message to bob and a broadcast."""
            records = []
            for n in range(per_publisher):
                body = streams.body(streams.topic_stream, server.name, n)
                records.append(accepted(await post_message(http, server, users["alice"], body)))
                if n % 20 == 0:
                    for name in OWN_STREAMS:
                        body = streams.body(name, server.name, n)
                        records.append(accepted(await post_message(http, server, users["alice"], body)))
            return records

        via_a, via_b = await asyncio.gather(publisher(web_a), publisher(web_b))
        records = via_a + via_b
        by_stream: Records = {name: [r for r in records if r.get("stream") == name] for name in streams.names}
        assert sum(len(v) for v in by_stream.values()) == len(records), (
            f"every record carries its stream: {[r for r in records if r.get('stream') not in streams.names][:3]}"
        )
        total = 2 * per_publisher
        await bob.wait_for(
            lambda s: all(len(s.of(name)) >= len(by_stream[name]) for name in streams.names),
            timeout=RECOVERY_TIMEOUT,
            what="every message at bob",
        )
        await carol.wait_for(
            lambda s: len(s.of(streams.topic_stream)) >= total,
            timeout=RECOVERY_TIMEOUT,
            what="the topic at carol",
        )
        # A last message per stream marks the end: a duplicate would have arrived before it.
        end = await publish_rounds(http, web_b, users["alice"], streams, 1, "end")
        await bob.wait_for(
            lambda s: all(s.reached(name, last_seq(end, name)) for name in streams.names), what="end markers"
        )
        await carol.wait_for(lambda s: s.reached(streams.topic_stream, total + 1), what="end marker")

        # The 202 records of the topic are numbered 1..N in acceptance order: each publisher's own
        # are increasing, together they are every number once.
        for own in (via_a, via_b):
            own_seqs = [r["seq"] for r in own if r["stream"] == streams.topic_stream]
            assert own_seqs == sorted(own_seqs), "one publisher's messages numbered in its order"
        topic_seqs = sorted(r["seq"] for r in by_stream[streams.topic_stream])
        assert topic_seqs == list(range(1, total + 1)), describe(topic_seqs, list(range(1, total + 1)))

        for sock in (bob, carol):
            assert_contiguous_from(sock, streams.topic_stream, 1, total + 1)
            epochs = {m.get("epoch") for m in sock.of(streams.topic_stream)}
            assert len(epochs) == 1 and isinstance(next(iter(epochs)), str), f"one epoch: {epochs}"
            record_seq = {r["id"]: r["seq"] for r in by_stream[streams.topic_stream]}
            assert all(
                record_seq.get(m["id"], m["seq"]) == m["seq"] for m in sock.of(streams.topic_stream)
            ), "a socket's seq is its record's seq"
            assert all(m["topic"] == streams.topic for m in sock.of(streams.topic_stream))

        for name in OWN_STREAMS:
            expected = sorted(r["seq"] for r in by_stream[name]) + [last_seq(end, name)]
            assert expected == list(range(expected[0], expected[-1] + 1)), f"{name} records: {expected}"
            assert bob.seqs(name) == expected, f"{name}: {describe(bob.seqs(name), expected)}"
            assert len({m["epoch"] for m in bob.of(name)}) == 1
        assert not [m for m in bob.messages if m.get("stream") not in streams.names], "no other streams"

        # Records carry `stream` and `seq` (CONTRACT §3).
        for name in streams.names:
            record = by_stream[name][-1]
            detail = await http.get(
                f"{web_b.url}/api/v1/messages/{record['id']}/", headers=users["alice"].headers
            )
            assert detail.status_code == 200, detail.text
            assert (detail.json()["stream"], detail.json()["seq"]) == (name, record["seq"]), detail.json()
        await bob.close()
        await carol.close()


async def test_subscribed_answers_carry_seq_and_epoch_and_recovered_with_since(cluster, users):
    web = cluster.add_web()
    web.wait_ready()
    streams = Streams.new("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        first = await open_ordered(http, web, users["bob"])
        empty = await subscribe(first, streams.topic)
        assert empty["seq"] == 0 and isinstance(empty["epoch"], str), empty
        assert "recovered" not in empty, "`recovered` only when `since` was given"
        records = await publish_rounds(http, web, users["alice"], streams, 3, "n")
        await first.wait_for(lambda s: s.reached(streams.topic_stream, 3), what="three messages")
        epoch = first.of(streams.topic_stream)[0]["epoch"]

        late = await open_ordered(http, web, users["carol"])
        plain = await subscribe(late, streams.topic)
        assert (plain["seq"], plain["epoch"]) == (3, epoch), plain
        assert "recovered" not in plain

        # Nothing missed: recovered, nothing replayed.
        up_to_date = await open_ordered(http, web, users["carol"])
        answer = await subscribe(up_to_date, streams.topic, {"seq": 3, "epoch": epoch})
        assert (answer["seq"], answer["epoch"], answer["recovered"]) == (3, epoch, True), answer

        # Two missed: the answer, then 2 and 3.
        behind = await open_ordered(http, web, users["carol"])
        answer = await subscribe(behind, streams.topic, {"seq": 1, "epoch": epoch})
        assert (answer["seq"], answer["epoch"], answer["recovered"]) == (3, epoch, True), answer
        await behind.wait_for(lambda s: s.reached(streams.topic_stream, 3), what="the replay")
        assert behind.seqs(streams.topic_stream) == [2, 3]
        assert [m["id"] for m in behind.of(streams.topic_stream)] == [
            r["id"] for r in records[streams.topic_stream][1:]
        ]

        # `resumed` carries the stream, its latest seq and epoch, and `recovered`.
        await first.wait_for(lambda s: s.reached("user", last_seq(records, "user")), what="bob's messages")
        user_seen = position_of(first, "user")
        resumed = await first.request({"type": "resume", "stream": "user", "since": user_seen}, "resumed")
        assert resumed == {"type": "resumed", "stream": "user", "recovered": True} | user_seen, resumed

        # A live message continues every socket's numbering.
        live = await publish_rounds(http, web, users["alice"], streams, 1, "live")
        assert last_seq(live, streams.topic_stream) == 4
        for sock in (first, late, up_to_date, behind):
            await sock.wait_for(lambda s: s.reached(streams.topic_stream, 4), what="seq 4")
        assert late.seqs(streams.topic_stream) == [4] and up_to_date.seqs(streams.topic_stream) == [4]
        for sock in (first, late, up_to_date, behind):
            await sock.close()


async def test_a_socket_that_saw_an_empty_topic_recovers_its_first_messages(cluster, users):
    """The epoch of a stream with no message yet is the one its messages carry: a client that
    subscribed before the first message and reconnects with `since` seq 0 loses nothing."""
    web = cluster.add_web()
    web.wait_ready()
    streams = Streams.new("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        sock = await open_ordered(http, web, users["bob"])
        empty = await subscribe(sock, streams.topic)
        await sock.close()
        records = await publish_rounds(http, web, users["alice"], streams, 3, "n")
        again = await open_ordered(http, web, users["bob"])
        answer = await subscribe(again, streams.topic, {"seq": empty["seq"], "epoch": empty["epoch"]})
        assert answer["recovered"] is True, f"{answer}, after an empty subscribe {empty}"
        await again.wait_for(lambda s: s.reached(streams.topic_stream, 3), what="the replay")
        assert again.seqs(streams.topic_stream) == [1, 2, 3]
        assert {m["epoch"] for m in again.of(streams.topic_stream)} == {empty["epoch"]}
        assert [m["id"] for m in again.of(streams.topic_stream)] == [
            r["id"] for r in records[streams.topic_stream]
        ]
        await again.close()


# --- recovery ----------------------------------------------------------------------------------


async def test_a_socket_of_a_killed_instance_recovers_every_stream_on_another_instance(cluster, users):
    web_a, web_b = cluster.add_web(), cluster.add_web()
    web_a.wait_ready()
    web_b.wait_ready()
    streams = Streams.new("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        sock, _ = await listen_and_read(http, web_a, web_b, users, streams, rounds=10)
        seen = seen_position(sock, streams)
        assert all(seen[name]["seq"] >= 10 for name in streams.names), seen
        await sock.close()
        missed = await publish_rounds(http, web_b, users["alice"], streams, 50, "missed")
        for name in streams.names:
            assert sorted(r["seq"] for r in missed[name]) == list(
                range(seen[name]["seq"] + 1, seen[name]["seq"] + 51)
            )
        web_a.kill()
        recovered = await recover(http, web_b, users, streams, seen, missed)
        assert recovered.welcome["instance"] == web_b.name
        await recovered.close()


# --- past the window ---------------------------------------------------------------------------


def assert_not_recovered(answer: dict[str, Any], seq: int, epoch: str) -> None:
    assert answer["type"] in ("subscribed", "resumed"), answer
    assert (answer.get("recovered"), answer.get("seq"), answer.get("epoch")) == (False, seq, epoch), answer


async def continue_after(
    http: httpx.AsyncClient, web: Any, users: dict[str, ApiUser], sock: OrderedSocket, streams: Streams, names
) -> None:
    """Nothing was replayed: the next live message of each stream is the answer's seq + 1, alone."""
    live = await publish_rounds(http, web, users["alice"], streams, 1, "after")
    await sock.wait_for(
        lambda s: all(s.reached(name, last_seq(live, name)) for name in names), what="the live messages"
    )
    for name in names:
        assert [m["id"] for m in sock.of(name)] == [live[name][0]["id"]], f"{name}: {sock.seqs(name)}"


async def test_more_missed_than_the_history_keeps_is_not_recovered_and_continues_live(cluster, users):
    web = cluster.add_web(RT_HISTORY_SIZE="20")
    web.wait_ready()
    streams = Streams.new("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        sock, _ = await listen_and_read(http, web, web, users, streams, rounds=2)
        seen = seen_position(sock, streams)
        await sock.close()
        missed = await publish_rounds(http, web, users["alice"], streams, 30, "missed")
        latest = {name: last_seq(missed, name) for name in streams.names}

        again = await open_ordered(http, web, users["bob"])
        answer = await subscribe(again, streams.topic, seen[streams.topic_stream])
        assert_not_recovered(answer, latest[streams.topic_stream], seen[streams.topic_stream]["epoch"])
        resumed = await again.request({"type": "resume", "stream": "user", "since": seen["user"]}, "resumed")
        assert_not_recovered(resumed, latest["user"], seen["user"]["epoch"])
        await continue_after(http, web, users, again, streams, (streams.topic_stream, "user"))

        # The history keeps the last 20 of the stream.
        history = await http.get(
            f"{web.url}/api/v1/history/", params={"topic": streams.topic}, headers=users["bob"].headers
        )
        assert history.status_code == 200, history.text
        kept = [m["seq"] for m in history.json()["messages"]]
        newest = latest[streams.topic_stream] + 1
        assert kept == list(range(newest - 19, newest + 1)), kept

        # Within the window it recovers again: 15 missed of 20 kept.
        position = position_of(again, streams.topic_stream)
        await again.close()
        missed = await publish_rounds(http, web, users["alice"], streams, 15, "within")
        third = await open_ordered(http, web, users["bob"])
        answer = await subscribe(third, streams.topic, position)
        assert answer["recovered"] is True, answer
        await third.wait_for(
            lambda s: s.reached(streams.topic_stream, last_seq(missed, streams.topic_stream)),
            timeout=RECOVERY_TIMEOUT,
            what="the replay",
        )
        first = position["seq"] + 1
        assert_contiguous_from(third, streams.topic_stream, first, first + 14)
        await third.close()


async def test_messages_older_than_the_history_ttl_are_not_recovered(cluster, users):
    web = cluster.add_web(RT_HISTORY_TTL="2")
    web.wait_ready()
    streams = Streams.new("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        sock, _ = await listen_and_read(http, web, web, users, streams, rounds=3)
        seen = position_of(sock, streams.topic_stream)
        await sock.close()
        missed = await publish_rounds(http, web, users["alice"], streams, 3, "missed")

        async def expired() -> bool:
            response = await http.get(
                f"{web.url}/api/v1/history/",
                params={"topic": streams.topic, "since": seen["seq"]},
                headers=users["bob"].headers,
            )
            assert response.status_code == 200, response.text
            return response.json()["messages"] == []

        await eventually(expired, 30, "the missed messages to outlive RT_HISTORY_TTL", interval=0.25)
        again = await open_ordered(http, web, users["bob"])
        answer = await subscribe(again, streams.topic, seen)
        assert_not_recovered(answer, last_seq(missed, streams.topic_stream), seen["epoch"])
        await continue_after(http, web, users, again, streams, (streams.topic_stream,))
        await again.close()


async def test_a_wrong_epoch_is_not_recovered(cluster, users):
    web = cluster.add_web()
    web.wait_ready()
    streams = Streams.new("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        sock, _ = await listen_and_read(http, web, web, users, streams, rounds=5)
        seen = seen_position(sock, streams)
        await sock.close()
        again = await open_ordered(http, web, users["bob"])
        answer = await subscribe(again, streams.topic, {"seq": 3, "epoch": "nope"})
        assert_not_recovered(answer, 5, seen[streams.topic_stream]["epoch"])
        for name in OWN_STREAMS:
            resumed = await again.request(
                {"type": "resume", "stream": name, "since": {"seq": 3, "epoch": "nope"}}, "resumed"
            )
            assert resumed.get("stream") == name, resumed
            assert_not_recovered(resumed, seen[name]["seq"], seen[name]["epoch"])
        await continue_after(http, web, users, again, streams, streams.names)
        # Malformed positions and streams are bad input; the socket stays open.
        for frame in (
            {"type": "subscribe", "topic": streams.topic, "since": "yesterday"},
            {"type": "subscribe", "topic": streams.topic, "since": {"seq": "3", "epoch": 5}},
            {"type": "resume", "stream": "topic:" + streams.topic, "since": seen["user"]},
            {"type": "resume", "stream": "user"},
        ):
            refused = await again.request(frame | {"ref": "bad"}, "never")
            assert (refused["type"], refused.get("code"), refused.get("ref")) == (
                "error",
                "invalid",
                "bad",
            ), (
                frame,
                refused,
            )
        assert (await again.request({"type": "ping"}, "pong"))["type"] == "pong"
        await again.close()


# --- GET /api/v1/history/ ------------------------------------------------------------------------


async def test_history_of_a_topic_and_of_the_callers_own_stream(cluster, users):
    web = cluster.add_web()
    web.wait_ready()
    streams = Streams.new("bob")
    restricted = f"r-{uuid.uuid4().hex[:8]}"

    def restrict() -> None:
        ops = Group.objects.create(name=f"ops-{restricted}")
        Topic.objects.create(name=restricted).groups.add(ops)
        from django.contrib.auth.models import User

        User.objects.get(username="bob").groups.add(ops)

    await database_sync_to_async(restrict)()
    async with httpx.AsyncClient(timeout=30) as http:

        async def history(caller: ApiUser | None, **params: Any) -> httpx.Response:
            return await http.get(
                f"{web.url}/api/v1/history/", params=params, headers=caller.headers if caller else {}
            )

        records = await publish_rounds(http, web, users["alice"], streams, 5, "h")
        for_carol = accepted(await post_message(http, web, users["alice"], {"user": "carol", "payload": 1}))
        topic_records = records[streams.topic_stream]

        whole = await history(users["carol"], topic=streams.topic)
        assert whole.status_code == 200, whole.text
        body = whole.json()
        epoch = body["epoch"]
        assert (body["stream"], body["seq"]) == (streams.topic_stream, 5) and isinstance(epoch, str), body
        assert [m["id"] for m in body["messages"]] == [r["id"] for r in topic_records], "oldest first"
        for message, record in zip(body["messages"], topic_records, strict=True):
            assert (message["stream"], message["seq"]) == (streams.topic_stream, record["seq"]), message
            assert message["payload"] == record["payload"] and message["topic"] == streams.topic

        page = (await history(users["carol"], topic=streams.topic, since=2, limit=2)).json()
        assert [m["seq"] for m in page["messages"]] == [3, 4]
        assert (page["stream"], page["epoch"], page["seq"]) == (streams.topic_stream, epoch, 5), page
        assert (await history(users["carol"], topic=streams.topic, since=5)).json()["messages"] == []

        mine = await history(users["bob"], user="me")
        assert mine.status_code == 200, mine.text
        mine = mine.json()
        assert (mine["stream"], mine["seq"]) == ("user", 5) and isinstance(mine["epoch"], str), mine
        assert [m["id"] for m in mine["messages"]] == [r["id"] for r in records["user"]]
        assert all(m["stream"] == "user" and m["user"] == "bob" for m in mine["messages"])
        carols = (await history(users["carol"], user="me", since=0)).json()
        assert (carols["seq"], [m["id"] for m in carols["messages"]]) == (1, [for_carol["id"]]), carols

        # A restricted topic: its group's members, publishers and staff; nobody else.
        published = accepted(
            await post_message(http, web, users["alice"], {"topic": restricted, "payload": 1})
        )
        for reader in ("bob", "alice", "staff"):
            answer = await history(users[reader], topic=restricted)
            assert answer.status_code == 200, (reader, answer.text)
            assert [m["id"] for m in answer.json()["messages"]] == [published["id"]]
        refused = await history(users["carol"], topic=restricted)
        assert refused.status_code == 403 and "detail" in refused.json(), refused.text
        assert (await history(None, topic=streams.topic)).status_code == 401
        assert (await history(users["bob"])).status_code == 400, "a topic or user=me is needed"
        assert (await history(users["bob"], topic=streams.topic, since="abc")).status_code == 400
