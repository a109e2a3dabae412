"""What production does to a deployment: broker restarts, killed and drained instances, slow clients."""

import asyncio
import base64
import os
import signal
import socket
import time

import httpx
import pytest
from django.db import close_old_connections
from prometheus_client.parser import text_string_to_metric_families

from notifications.models import Delivery
from tests.support.broker import queue_stats
from tests.support.clients import open_socket, post_message, ticket
from tests.support.metrics import is_ready, metric
from tests.support.processes import rss_kib
from tests.support.skips import needs_rabbitmq_server
from tests.support.waiting import eventually


@needs_rabbitmq_server
async def test_broker_restart_instances_and_workers_resume_and_nothing_accepted_is_lost(
    cluster, users, private_rabbit
):
    cluster.extra_env["AMQP_URL"] = private_rabbit.url
    web_a, web_b = cluster.add_web(), cluster.add_web()
    cluster.add_worker()
    web_a.wait_ready()
    web_b.wait_ready()
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web_a, users["bob"])
        carol = await open_socket(http, web_b, users["carol"])
        for listener in (bob, carol):
            await listener.request({"type": "subscribe", "topic": "news"}, "subscribed")
        accepted = []
        first = await post_message(http, web_a, users["alice"], {"topic": "news", "event": "before"})
        assert first.status_code == 202
        accepted.append(first.json()["id"])

        await asyncio.to_thread(private_rabbit.stop_app)
        await eventually(lambda: _not(is_ready(http, web_a)), 30, "web-1 to notice the outage")
        during = await post_message(http, web_a, users["alice"], {"topic": "news", "event": "during"})
        assert during.status_code in (202, 503), during.text
        if during.status_code == 202:
            accepted.append(during.json()["id"])
        refused = await bob.request(
            {"type": "send", "ref": "r-out", "event": "echo", "payload": 1}, "receipt"
        )
        receipts = []
        if refused["type"] == "error":
            assert (refused["code"], refused["ref"]) == ("unavailable", "r-out")
        else:
            receipts.append(refused["id"])

        await asyncio.to_thread(private_rabbit.start_app)
        for web in (web_a, web_b):
            await eventually(lambda web=web: is_ready(http, web), 60, f"{web.name} to reconnect")

        async def workers_consuming():
            stats = await queue_stats(f"{cluster.namespace}.inbound", url=private_rabbit.url)
            return stats is not None and stats[1] >= 1

        await eventually(workers_consuming, 60, "the worker to consume again")
        assert bob.closed_code is None and carol.closed_code is None, "sockets stay open through an outage"

        after = await post_message(http, web_b, users["alice"], {"topic": "news", "event": "after"})
        assert after.status_code == 202
        accepted.append(after.json()["id"])
        for listener in (bob, carol):
            await listener.wait_for(lambda s: len(s.messages) >= len(accepted), timeout=30, what="messages")
        receipt = await bob.request(
            {"type": "send", "ref": "r-after", "event": "echo", "payload": 2}, "receipt"
        )
        assert receipt["type"] == "receipt"
        receipts.append(receipt["id"])

        def echoed(s):
            return {m["payload"]["inbound"] for m in s.messages if m["event"] == "echo"} >= set(receipts)

        await bob.wait_for(echoed, timeout=30, what="echoes")
        marker = await post_message(http, web_b, users["alice"], {"broadcast": True, "event": "end"})
        for listener in (bob, carol):
            await listener.wait_for(lambda s: s.messages[-1]["id"] == marker.json()["id"], what="marker")
            topic_ids = [m["id"] for m in listener.messages if m["topic"] == "news"]
            assert topic_ids == accepted, "every accepted message exactly once, in order"
        echoes = [m["payload"]["inbound"] for m in bob.messages if m["event"] == "echo"]
        assert sorted(echoes) == sorted(receipts), "every receipt got exactly one echo"
        await bob.close()
        await carol.close()


async def _not(awaitable) -> bool:
    return not await awaitable


async def test_sigkill_of_one_instance_leaves_the_others_delivering(cluster, users):
    web_a, web_b = cluster.add_web(), cluster.add_web()
    web_a.wait_ready()
    web_b.wait_ready()
    async with httpx.AsyncClient(timeout=30) as http:
        on_a = await open_socket(http, web_a, users["bob"])
        on_b = await open_socket(http, web_b, users["bob"])
        web_a.kill()
        await on_a.wait_for(lambda s: s.closed_code is not None, what="the killed instance's socket to drop")
        sent = await post_message(http, web_b, users["alice"], {"user": "bob", "event": "after-kill"})
        assert sent.status_code == 202
        await on_b.wait_for(
            lambda s: [m["id"] for m in s.messages] == [sent.json()["id"]], what="delivery on b"
        )
        # The client of the dead instance reconnects elsewhere and receives again.
        moved = await open_socket(http, web_b, users["bob"])
        again = await post_message(http, web_b, users["alice"], {"user": "bob", "event": "again"})
        await moved.wait_for(
            lambda s: [m["id"] for m in s.messages] == [again.json()["id"]], what="after move"
        )
        await moved.close()
        await on_b.close()


async def test_sigterm_drains_closes_sockets_with_1001_and_flushes_the_delivery_log(cluster, users):
    # A long log interval: only the drain's own flush can write the delivery row in time.
    web = cluster.add_web(RT_DELIVERY_LOG_INTERVAL="60", RT_DRAIN_SECONDS="8")
    web.wait_ready()
    async with httpx.AsyncClient(timeout=30) as http:
        sockets = [await open_socket(http, web, users["bob"]) for _ in range(3)]
        sent = await post_message(http, web, users["alice"], {"user": "bob", "event": "last"})
        for s in sockets:
            await s.wait_for(lambda s: len(s.messages) == 1, what="the message")
        started = time.monotonic()
        web.signal(signal.SIGTERM)
        for s in sockets:
            await s.wait_for(lambda s: s.closed_code is not None, what="close")
            assert s.closed_code == 1001, "going away: reconnect elsewhere"
        code = await asyncio.to_thread(web.process.wait, 20)
        assert time.monotonic() - started < 20
        assert code == 0 or code == -signal.SIGTERM or code == 1, web.log_tail()

    def logged() -> int:
        close_old_connections()
        return Delivery.objects.filter(message_id=sent.json()["id"], instance=web.name).count()

    assert await asyncio.to_thread(logged) == 3


def _raw_socket_that_never_reads(port: int, ticket_value: str) -> socket.socket:
    """Open a WebSocket by hand with a tiny receive buffer, then never read from it."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    raw.sendall(
        (
            f"GET /ws/?ticket={ticket_value} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    raw.settimeout(10)
    response = b""
    while b"\r\n\r\n" not in response:
        response += raw.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return raw


async def test_a_client_that_never_reads_is_closed_and_memory_stays_bounded(cluster, users):
    web = cluster.add_web(RT_SOCKET_MAX_BUFFER_BYTES=str(256 * 1024))
    web.wait_ready()
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
        await bob.request({"type": "subscribe", "topic": "pulse"}, "subscribed")
        raw = await asyncio.to_thread(
            _raw_socket_that_never_reads, web.port, await ticket(http, web.url, users["carol"])
        )
        rss_before = rss_kib(web.process.pid)
        chunk = "x" * 30_000
        pulses = []
        try:
            for n in range(300):
                response = await post_message(
                    http, web, users["alice"], {"user": "carol", "event": "big", "payload": chunk}
                )
                assert response.status_code == 202
                if n % 10 == 0:
                    pulse = await post_message(
                        http, web, users["alice"], {"topic": "pulse", "event": "p", "payload": n}
                    )
                    pulses.append(pulse.json()["id"])
                metrics = (await http.get(f"{web.url}/metrics")).text
                if metrics and metric(metrics, "rt_slow_readers_closed_total", web.name) >= 1:
                    break
            else:
                pytest.fail("the slow reader was never closed")
            growth_mib = (rss_kib(web.process.pid) - rss_before) / 1024
            # 9 MB was published at it; what the server holds stays near the configured buffer.
            assert growth_mib < 40, f"server RSS grew {growth_mib:.1f} MiB"
            await bob.wait_for(lambda s: [m["id"] for m in s.messages] == pulses, timeout=20, what="pulses")
        finally:
            raw.close()
        await bob.close()


async def test_metrics_parse_and_move_as_messages_flow(cluster, users):
    web = cluster.add_web()
    web.wait_ready()
    async with httpx.AsyncClient(timeout=30) as http:
        before = (await http.get(f"{web.url}/metrics")).text
        families = {f.name for f in text_string_to_metric_families(before)}
        assert {
            "rt_connections",
            "rt_deliveries",
            "rt_broker_connected",
            "rt_publish_latency_seconds",
        } <= families
        assert metric(before, "rt_broker_connected", web.name) == 1
        bob = await open_socket(http, web, users["bob"])
        for n in range(3):
            assert (
                await post_message(http, web, users["alice"], {"user": "bob", "payload": n})
            ).status_code == 202
        await bob.wait_for(lambda s: len(s.messages) == 3, what="messages")
        after = (await http.get(f"{web.url}/metrics")).text
        assert metric(after, "rt_connections", web.name) == 1
        assert (
            metric(after, "rt_deliveries_total", web.name) - metric(before, "rt_deliveries_total", web.name)
            == 3
        )
        assert metric(after, "rt_messages_published_total", web.name) >= 3
        assert metric(after, "rt_publish_latency_seconds_count", web.name) >= 3
        await bob.close()
