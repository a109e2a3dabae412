"""notifications/amqp_nodes.py: AMQP_URL with several nodes, their redaction, the failover order."""

import asyncio
import inspect
import logging

import pytest
from aio_pika.connection import Connection
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from notifications import amqp_nodes, broker
from notifications.amqp_nodes import FailoverConnection
from notifications.backoff import Backoff


@pytest.mark.parametrize(
    "amqp_url, nodes",
    [
        ("amqp://guest:guest@127.0.0.1:5672/", ["amqp://guest:guest@127.0.0.1:5672/"]),
        (
            "amqp://u:p@rabbit-1:5672/,amqp://u:p@rabbit-2:5672/,amqp://u:p@rabbit-3:5672/",
            ["amqp://u:p@rabbit-1:5672/", "amqp://u:p@rabbit-2:5672/", "amqp://u:p@rabbit-3:5672/"],
        ),
        ("  amqp://a/ ,  amqps://b:5671/vh ", ["amqp://a/", "amqps://b:5671/vh"]),
        ("amqp://a/,,amqp://b/,", ["amqp://a/", "amqp://b/"]),
        ("AMQP://a/,AMQPS://b/", ["AMQP://a/", "AMQPS://b/"]),
        # A comma inside a password is not a separator: only one before the next scheme is.
        ("amqp://u:pa,ss@a/,amqp://u:x,y@b/", ["amqp://u:pa,ss@a/", "amqp://u:x,y@b/"]),
        ("amqp://a/?heartbeat=5&name=x,amqp://b/", ["amqp://a/?heartbeat=5&name=x", "amqp://b/"]),
    ],
)
def test_parse_lists_the_nodes_in_the_order_given(amqp_url, nodes):
    assert amqp_nodes.parse(amqp_url) == nodes


@pytest.mark.parametrize("amqp_url", ["", "  ", ",", " , ,"])
def test_parse_refuses_a_url_without_nodes(amqp_url):
    with pytest.raises(ValueError, match="no RabbitMQ node"):
        amqp_nodes.parse(amqp_url)


def test_parse_refuses_what_is_not_an_amqp_url_without_showing_its_password():
    with pytest.raises(ValueError) as refused:
        amqp_nodes.parse("amqp://u:p@a/,http://admin:s3cret@b/")
    assert "s3cret" not in str(refused.value) and "admin:***@b" in str(refused.value)


def test_redaction_hides_every_password_and_keeps_every_node():
    amqp_url = (
        "amqp://app:first@rabbit-1:5672/,amqp://app:second@rabbit-2:5672/, amqps://ops:th,ird@rabbit-3/vh"
    )
    redacted = broker.redacted_url(amqp_url)
    assert (
        redacted == "amqp://app:***@rabbit-1:5672/,amqp://app:***@rabbit-2:5672/,amqps://ops:***@rabbit-3/vh"
    )
    for secret in ("first", "second", "th,ird", "ird"):
        assert secret not in redacted


@pytest.mark.parametrize(
    "url, redacted",
    [
        ("amqp://guest:s3cret@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("amqp://app:pa@ss@rabbit.example/", "amqp://app:***@rabbit.example/"),
        ("amqp://127.0.0.1:5672/", "amqp://127.0.0.1:5672/"),
        ("amqp://a/,amqp://u:p@b/", "amqp://a/,amqp://u:***@b/"),
    ],
)
def test_redact_one_node_or_several(url, redacted):
    assert amqp_nodes.redact(url) == redacted


def test_rotation_visits_every_node_once_from_the_start():
    assert amqp_nodes.rotation(3, 0) == [0, 1, 2]
    assert amqp_nodes.rotation(3, 2) == [2, 0, 1]
    assert amqp_nodes.rotation(1, 0) == [0]
    assert {amqp_nodes.random_start(3) for _ in range(200)} == {0, 1, 2}


def test_the_aio_pika_hook_failover_relies_on_is_still_there():
    # FailoverConnection overrides this private method of aio-pika 10 (requirements.txt pins the
    # version): if an upgrade renames it, connections would silently stay on a dead node.
    hook = "_RobustConnection__connect_transport"
    assert inspect.iscoroutinefunction(getattr(RobustConnection, hook, None))
    assert hook in FailoverConnection.__dict__


async def test_settling_before_moving_on_is_for_clusters_only():
    one = FailoverConnection([URL("amqp://a/")])
    several = FailoverConnection([URL("amqp://a/"), URL("amqp://b/")])
    assert one.settle_delay == 0
    assert several.settle_delay == amqp_nodes.SETTLE_DELAY
    await one.close()
    await several.close()


async def test_each_reconnection_attempt_goes_to_the_next_node(monkeypatch):
    tried: list[str] = []

    async def refuse(self, timeout=None):
        tried.append(self.url.host)
        raise ConnectionRefusedError("nobody home")

    monkeypatch.setattr(Connection, "connect", refuse)
    nodes = [URL(f"amqp://guest:guest@{host}:5672/") for host in ("a", "b", "c")]
    connection = FailoverConnection(nodes, 1, fail_fast=False, reconnect_interval=0.001)
    connection._round_backoff = Backoff(0.001, first=0.001)
    attempt = asyncio.create_task(connection.connect())
    try:
        async with asyncio.timeout(10):
            while len(tried) < 7:
                await asyncio.sleep(0.001)
    finally:
        attempt.cancel()
        await connection.close()
        await asyncio.gather(attempt, return_exceptions=True)
    assert tried[:7] == ["b", "c", "a", "b", "c", "a", "b"]
    assert connection.node.endswith(f"@{tried[-1]}:5672/")
    assert "guest:guest" not in connection.node


async def test_connect_tries_every_node_then_backs_off_until_stopped(settings, monkeypatch):
    tried: list[str] = []
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger(broker.__name__).addHandler(handler)

    async def refuse(nodes, first, **kwargs):
        tried.append(nodes[first])
        raise ConnectionRefusedError("nobody home")

    monkeypatch.setattr(amqp_nodes, "connect", refuse)
    monkeypatch.setattr(amqp_nodes, "random_start", lambda count: 2)
    settings.AMQP_URL = "amqp://u:pw1@a/,amqp://u:pw2@b/,amqp://u:pw3@c/"
    stop = asyncio.Event()
    task = asyncio.create_task(broker.connect(stop))
    async with asyncio.timeout(10):
        while len(tried) < 4:
            await asyncio.sleep(0.01)
    stop.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    logging.getLogger(broker.__name__).removeHandler(handler)
    assert [url.split("@")[1] for url in tried[:4]] == ["c/", "a/", "b/", "c/"]
    text = "\n".join(logged)
    assert "amqp://u:***@c/" in text and "pw1" not in text and "pw3" not in text
