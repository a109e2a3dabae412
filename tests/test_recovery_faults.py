"""Recovery through faults (CONTRACT §5.5): a drained instance, a broker restart.

The scenario is tests/test_streams.py's: a socket reads its three streams, loses its connection,
misses messages, reconnects to another instance and resumes with `since`, while a publisher
keeps going; every stream must answer first, then replay in order and once, then go live.
"""

import asyncio
import signal

import httpx

from tests.support.broker import queue_stats
from tests.support.clients import post_message
from tests.support.metrics import is_ready
from tests.support.skips import needs_rabbitmq_server
from tests.support.waiting import eventually
from tests.test_streams import (
    RECOVERY_TIMEOUT,
    Records,
    Streams,
    assert_contiguous_from,
    last_seq,
    listen_and_read,
    merge,
    open_ordered,
    publish_rounds,
    recover,
    seen_position,
    subscribe,
)


def after(records: Records, seen: dict) -> Records:
    """The records a socket missed: those numbered after what it saw."""
    return {name: [r for r in found if r["seq"] > seen[name]["seq"]] for name, found in records.items()}


async def test_a_socket_of_a_drained_instance_recovers_every_stream_on_another_instance(cluster, users):
    web_a, web_b = cluster.add_web(RT_DRAIN_SECONDS="5"), cluster.add_web()
    web_a.wait_ready()
    web_b.wait_ready()
    streams = Streams.new("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        sock, _ = await listen_and_read(http, web_a, web_b, users, streams, rounds=10)
        # Messages keep coming while A drains: some reach the socket before it closes, the rest
        # it recovers on B.
        publisher = asyncio.create_task(publish_rounds(http, web_b, users["alice"], streams, 50, "missed"))
        await sock.wait_for(
            lambda s: s.reached(streams.topic_stream, 13), timeout=RECOVERY_TIMEOUT, what="live messages"
        )
        web_a.signal(signal.SIGTERM)
        await sock.wait_for(lambda s: s.closed_code is not None, timeout=30, what="the drain to close it")
        assert sock.closed_code == 1001, "going away: reconnect elsewhere"
        published = await publisher
        code = await asyncio.to_thread(web_a.process.wait, 30)
        assert code in (0, 1, -signal.SIGTERM), web_a.log_tail()

        # What the drained socket got was in order, without gap, up to where it closed.
        for name in streams.names:
            assert_contiguous_from(sock, name, sock.seqs(name)[0], sock.seqs(name)[-1])
        seen = seen_position(sock, streams)
        missed = after(published, seen)
        assert missed[streams.topic_stream], "the socket closed before the publisher was done"
        recovered = await recover(http, web_b, users, streams, seen, missed)
        assert recovered.welcome["instance"] == web_b.name
        await recovered.close()


async def _published(http: httpx.AsyncClient, web, user, records: Records) -> bool:
    """Every record's message is confirmed by the broker (`published`)."""
    for found in records.values():
        for record in found:
            detail = await http.get(f"{web.url}/api/v1/messages/{record['id']}/", headers=user.headers)
            if detail.status_code != 200 or detail.json()["status"] != "published":
                return False
    return True


@needs_rabbitmq_server
async def test_after_a_broker_restart_a_socket_recovers_and_a_socket_that_stayed_lost_nothing(
    cluster, users, private_rabbit
):
    # The workers' sweeper publishes what was accepted but not confirmed during the outage.
    cluster.extra_env |= {"AMQP_URL": private_rabbit.url, "RT_SWEEP_GRACE_SECONDS": "2"}
    web_a, web_b = cluster.add_web(), cluster.add_web()
    cluster.add_worker()
    web_a.wait_ready()
    web_b.wait_ready()
    streams = Streams.new("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        stay = await open_ordered(http, web_a, users["carol"])
        await subscribe(stay, streams.topic)
        sock, _ = await listen_and_read(http, web_a, web_b, users, streams, rounds=10)
        seen = seen_position(sock, streams)
        await sock.close()

        await asyncio.to_thread(private_rabbit.stop_app)
        for web in (web_a, web_b):
            await eventually(lambda web=web: _not(is_ready(http, web)), 30, f"{web.name} to see the outage")
        during = await publish_rounds(http, web_b, users["alice"], streams, 5, "outage", tolerate_503=True)
        await asyncio.to_thread(private_rabbit.start_app)
        for web in (web_a, web_b):
            await eventually(lambda web=web: is_ready(http, web), 60, f"{web.name} to reconnect")

        async def worker_consuming() -> bool:
            stats = await queue_stats(f"{cluster.namespace}.inbound", url=private_rabbit.url)
            return stats is not None and stats[1] >= 1

        await eventually(worker_consuming, 60, "the worker to consume again")
        later = await publish_rounds(http, web_b, users["alice"], streams, 30, "after")
        missed = merge(during, later)
        await eventually(
            lambda: _published(http, web_b, users["alice"], during),
            90,
            "the outage's messages to be published",
        )
        recovered = await recover(http, web_b, users, streams, seen, missed)
        assert recovered.welcome["instance"] == web_b.name

        # The socket that stayed on A through the outage got every message of its streams once, in
        # order: the instance filled from the history whatever its queue lost.
        topic_last = max(recovered.seqs(streams.topic_stream))
        broadcast_last = max(recovered.seqs("broadcast"))
        try:
            await stay.wait_for(
                lambda s: (
                    s.reached(streams.topic_stream, topic_last) and s.reached("broadcast", broadcast_last)
                ),
                timeout=RECOVERY_TIMEOUT,
                what="the staying socket to catch up",
            )
        finally:
            assert stay.closed_code is None, "sockets stay open through an outage"
        assert_contiguous_from(stay, streams.topic_stream, 1, topic_last)
        broadcasts = stay.seqs("broadcast")
        assert_contiguous_from(stay, "broadcast", broadcasts[0], broadcast_last)
        await recovered.close()
        await stay.close()


async def _not(awaitable) -> bool:
    return not await awaitable


async def test_publishing_during_the_drain_numbers_every_accepted_message(cluster, users):
    """A publish through the draining instance either is accepted (and then numbered and
    delivered) or refused; the other instance's sockets see the stream without gap."""
    cluster.extra_env["RT_SWEEP_GRACE_SECONDS"] = "2"
    web_a, web_b = cluster.add_web(RT_DRAIN_SECONDS="5"), cluster.add_web()
    cluster.add_worker()
    web_a.wait_ready()
    web_b.wait_ready()
    streams = Streams.new("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        listener = await open_ordered(http, web_b, users["bob"])
        await subscribe(listener, streams.topic)
        accepted_ids = []
        unknown = []
        refused = []

        async def publish_through_a() -> None:
            for n in range(200):
                try:
                    response = await post_message(
                        http, web_a, users["alice"], streams.body(streams.topic_stream, "drain", n)
                    )
                except httpx.TransportError:
                    unknown.append(n)  # cut off mid-request: accepted or not, unknown
                    return
                if response.status_code == 202:
                    accepted_ids.append(response.json()["id"])
                else:
                    refused.append((n, response.status_code, response.text[:300]))
                    if response.status_code >= 500:
                        return

        task = asyncio.create_task(publish_through_a())
        await listener.wait_for(lambda s: s.reached(streams.topic_stream, 5), timeout=RECOVERY_TIMEOUT)
        web_a.signal(signal.SIGTERM)
        await task
        await asyncio.to_thread(web_a.process.wait, 30)
        end = await publish_rounds(http, web_b, users["alice"], streams, 1, "end")
        final = last_seq(end, streams.topic_stream)
        await listener.wait_for(
            lambda s: s.reached(streams.topic_stream, final), timeout=RECOVERY_TIMEOUT, what="the end marker"
        )
        assert_contiguous_from(listener, streams.topic_stream, 1, final)
        delivered = [m["id"] for m in listener.of(streams.topic_stream)][:-1]
        assert [i for i in delivered if i in set(accepted_ids)] == accepted_ids, "every 202, in order"
        assert len(accepted_ids) <= len(delivered) <= len(accepted_ids) + len(unknown), (
            "nothing numbered but the accepted messages (and one cut off mid-request)",
            refused,
            [(m["seq"], m["payload"]) for m in listener.of(streams.topic_stream)[-3:]],
        )
        await listener.close()
