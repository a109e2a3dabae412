"""consumers_app/registry.py: which local sockets each stream is delivered to."""

from consumers_app.registry import SocketRegistry
from tests.support.stream_sockets import FakeSocket


def setup_registry():
    registry = SocketRegistry()
    a1, a2, b1 = FakeSocket("a1", 1), FakeSocket("a2", 1), FakeSocket("b1", 2)
    for socket in (a1, a2, b1):
        registry.add(socket)
        registry.go_live(socket, "broadcast")
        registry.go_live(socket, f"user:{socket.user_id}")
    return registry, a1, a2, b1


def same(left, right) -> bool:
    return sorted(left, key=id) == sorted(right, key=id) and len(left) == len(right)


def test_the_broadcast_stream_reaches_every_live_socket():
    registry, a1, a2, b1 = setup_registry()
    assert len(registry) == 3
    assert same(registry.targets("broadcast"), [a1, a2, b1])


def test_a_topic_reaches_its_live_subscribers_only():
    registry, a1, a2, b1 = setup_registry()
    for socket, topic in ((a1, "orders"), (b1, "orders"), (a2, "other")):
        registry.subscribe(socket, topic)
        registry.go_live(socket, f"topic:{topic}")
    assert same(registry.targets("topic:orders"), [a1, b1])
    assert same(registry.targets("topic:other"), [a2])
    assert registry.targets("topic:nobody") == []


def test_a_user_stream_reaches_that_users_sockets():
    registry, a1, a2, b1 = setup_registry()
    assert same(registry.targets("user:1"), [a1, a2])
    assert same(registry.targets("user:2"), [b1])
    assert registry.targets("user:3") == []
    assert same(registry.by_user[1], [a1, a2])


def test_a_socket_that_is_not_registered_cannot_go_live():
    registry, *_ = setup_registry()
    stranger = FakeSocket("x", 9)
    registry.go_live(stranger, "broadcast")
    registry.subscribe(stranger, "orders")
    assert stranger not in registry.targets("broadcast")
    assert stranger not in registry.topics_of


def test_unsubscribe_and_stop_live_take_a_socket_off_a_stream():
    registry, a1, a2, b1 = setup_registry()
    registry.subscribe(a1, "orders")
    registry.go_live(a1, "topic:orders")
    registry.unsubscribe(a1, "orders")
    assert registry.targets("topic:orders") == [] and "topic:orders" not in registry.live
    assert registry.topics_of[a1] == set()
    registry.stop_live(a2, "broadcast")
    assert same(registry.targets("broadcast"), [a1, b1])


def test_remove_drops_the_socket_from_every_index():
    registry, a1, a2, b1 = setup_registry()
    for topic in ("orders", "news"):
        registry.subscribe(a1, topic)
        registry.go_live(a1, f"topic:{topic}")
    registry.remove(a1)
    assert len(registry) == 2
    assert same(registry.targets("broadcast"), [a2, b1])
    assert same(registry.targets("user:1"), [a2])
    assert registry.targets("topic:orders") == []
    assert a1 not in registry.topics_of
    # Empty index entries are removed, not left to grow.
    assert "topic:orders" not in registry.live and "topic:news" not in registry.live
    registry.remove(a2)
    assert 1 not in registry.by_user and "user:1" not in registry.live
    registry.remove(a2)  # twice is harmless
