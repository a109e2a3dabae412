"""notifications/broker.py: packing several items in one broker message, ids, names, logs."""

import orjson
import pytest

from notifications import broker
from notifications.broker import Topology


def frame(n: int) -> dict:
    return {"id": f"00000000-0000-0000-0000-{n:012d}", "event": "echo", "payload": {"n": n}}


def test_one_item_travels_as_itself():
    assert broker.pack(broker.FRAMES, [frame(1)]) == frame(1)
    assert broker.unpack(frame(1), broker.FRAMES) == [frame(1)]


def test_several_items_travel_under_the_key_and_come_back_in_order():
    items = [frame(1), frame(2), frame(3)]
    packed = broker.pack(broker.MESSAGES, items)
    assert packed == {"messages": items}
    assert broker.unpack(packed, broker.MESSAGES) == items


@pytest.mark.parametrize(
    "body",
    [
        {"frames": []},
        {"frames": "x"},
        {"frames": {"id": "a"}},
        {"frames": None},
    ],
    ids=["empty", "string", "object", "null"],
)
def test_unpack_refuses_what_pack_never_makes(body):
    with pytest.raises(ValueError):
        broker.unpack(body, broker.FRAMES)


def test_unpack_leaves_each_item_to_its_reader():
    # One item that is not an object must fail alone, not take its neighbours down.
    body = {"frames": [frame(1), "x", [frame(2)], 1]}
    assert broker.unpack(body, broker.FRAMES) == [frame(1), "x", [frame(2)], 1]


def test_unpack_reads_only_its_own_key():
    # A message on <ns>.broadcast is not unpacked by the inbound key, and vice versa.
    body = {"messages": "whatever", "id": "x"}
    assert broker.unpack(body, broker.FRAMES) == [body]


@pytest.mark.parametrize("count", [1, 2, 5])
def test_pack_encoded_is_the_encoding_of_pack(count):
    items = [frame(n) for n in range(count)]
    encoded = [orjson.dumps(item) for item in items]
    for key in (broker.FRAMES, broker.MESSAGES):
        assert broker.pack_encoded(key, encoded) == orjson.dumps(broker.pack(key, items))
        assert broker.unpack(broker.decode(broker.pack_encoded(key, encoded)), key) == items


def test_decode_refuses_json_that_is_not_an_object():
    for body in (b"[]", b"1", b'"x"', b"null"):
        with pytest.raises(ValueError):
            broker.decode(body)
    with pytest.raises(ValueError):  # orjson.JSONDecodeError is a ValueError
        broker.decode(b"not json")


def test_message_id_of_one_item_is_its_own_id():
    assert broker.message_id_for(["abc"]) == "abc"


def test_message_id_of_several_items_is_a_fresh_batch_id():
    ids = {broker.message_id_for(["a", "b"]) for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("batch-") for i in ids)
    assert "a" not in ids and "b" not in ids


def test_topology_names(settings):
    settings.RT_INBOUND_RETRY_DELAYS = [1, 2, 4, 8]
    topology = Topology("ns1")
    assert topology.broadcast_exchange == "ns1.broadcast"
    assert topology.all_exchange_names() == ["ns1.broadcast", "ns1.route"]
    assert topology.instance_queue("web-2") == "ns1.instance.web-2"
    assert topology.inbound_queue == "ns1.inbound"
    assert topology.dead_queue == "ns1.inbound.dead"
    assert topology.retry_queue(4) == "ns1.inbound.retry.4s"
    assert topology.all_queue_names(["web-1", "web-2"]) == [
        "ns1.inbound",
        "ns1.inbound.dead",
        "ns1.inbound.retry.1s",
        "ns1.inbound.retry.2s",
        "ns1.inbound.retry.4s",
        "ns1.inbound.retry.8s",
        "ns1.instance.web-1",
        "ns1.instance.web-2",
    ]


def test_current_topology_follows_the_namespace_setting(settings):
    settings.RT_NAMESPACE = "other"
    assert broker.current_topology() == Topology("other")


@pytest.mark.parametrize(
    "url, redacted",
    [
        ("amqp://guest:s3cret@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("amqps://app:p%40ss@rabbit.example:5671/vhost", "amqps://app:***@rabbit.example:5671/vhost"),
        ("amqp://app:pa@ss@rabbit.example/", "amqp://app:***@rabbit.example/"),
        ("amqp://app:a:b@rabbit.example/", "amqp://app:***@rabbit.example/"),
    ],
)
def test_redacted_url_hides_the_password(url, redacted):
    assert broker.redacted_url(url) == redacted


def test_redacted_url_of_several_nodes_hides_every_password():
    redacted = broker.redacted_url("amqp://u:first@node1:5672/,amqp://u:second@node2:5672/")
    assert "first" not in redacted and "second" not in redacted


@pytest.mark.parametrize("url", ["amqp://127.0.0.1:5672/", "amqp://rabbit.example/vhost", "amqp://localhost"])
def test_redacted_url_without_credentials_is_unchanged(url):
    assert broker.redacted_url(url) == url
