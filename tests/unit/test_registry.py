"""consumers_app/registry.py: which local sockets a broker message is for."""

from dataclasses import dataclass, field

from consumers_app.registry import SocketRegistry


@dataclass(eq=False)
class FakeSocket:
    connection_id: str
    user_id: int
    frames: list = field(default_factory=list)

    def deliver(self, frame: bytes, wire: bytes | None = None) -> bool:
        self.frames.append(frame)
        return True


def setup_registry():
    registry = SocketRegistry()
    a1, a2, b1 = FakeSocket("a1", 1), FakeSocket("a2", 1), FakeSocket("b1", 2)
    for socket in (a1, a2, b1):
        registry.add(socket)
    return registry, a1, a2, b1


def same(left, right) -> bool:
    return sorted(left, key=id) == sorted(right, key=id) and len(left) == len(right)


def test_broadcast_reaches_every_socket():
    registry, a1, a2, b1 = setup_registry()
    assert len(registry) == 3
    assert same(registry.targets({"broadcast": True}), [a1, a2, b1])
    # broadcast wins over a topic or user that came along
    assert same(registry.targets({"broadcast": True, "topic": "t", "user_id": 1}), [a1, a2, b1])


def test_a_topic_reaches_its_subscribers_only():
    registry, a1, a2, b1 = setup_registry()
    registry.subscribe(a1, "orders")
    registry.subscribe(b1, "orders")
    registry.subscribe(a2, "other")
    assert same(registry.targets({"topic": "orders"}), [a1, b1])
    assert same(registry.targets({"topic": "other"}), [a2])
    assert registry.targets({"topic": "nobody"}) == []
    # A topic message is for the topic's subscribers, whatever user_id comes along.
    assert same(registry.targets({"topic": "orders", "user_id": 1}), [a1, b1])


def test_a_user_message_reaches_that_users_sockets():
    registry, a1, a2, b1 = setup_registry()
    assert same(registry.targets({"user_id": 1}), [a1, a2])
    assert same(registry.targets({"user_id": 2}), [b1])
    assert registry.targets({"user_id": 3}) == []


def test_a_message_without_a_target_reaches_nobody():
    registry, *_ = setup_registry()
    assert registry.targets({}) == []
    assert registry.targets({"topic": None, "user_id": None, "broadcast": False}) == []


def test_remove_drops_the_socket_from_every_index():
    registry, a1, a2, b1 = setup_registry()
    registry.subscribe(a1, "orders")
    registry.subscribe(a1, "news")
    registry.remove(a1)
    assert len(registry) == 2
    assert same(registry.targets({"broadcast": True}), [a2, b1])
    assert same(registry.targets({"user_id": 1}), [a2])
    assert registry.targets({"topic": "orders"}) == []
    assert a1 not in registry.topics_of
    # Empty index entries are removed, not left to grow.
    assert "orders" not in registry.by_topic and "news" not in registry.by_topic
    registry.remove(a2)
    assert 1 not in registry.by_user
    registry.remove(a2)  # twice is harmless


def test_subscribing_a_socket_that_was_not_added_is_ignored():
    registry, *_ = setup_registry()
    stranger = FakeSocket("x", 9)
    registry.subscribe(stranger, "orders")
    assert registry.targets({"topic": "orders"}) == []
    assert stranger not in registry.topics_of
    assert "orders" not in registry.by_topic
    # ...and a socket already removed cannot come back through subscribe either.
    registry2, a1, _, _ = setup_registry()
    registry2.remove(a1)
    registry2.subscribe(a1, "orders")
    assert registry2.targets({"topic": "orders"}) == []


def test_unsubscribe_drops_one_topic():
    registry, a1, a2, _ = setup_registry()
    registry.subscribe(a1, "orders")
    registry.subscribe(a1, "news")
    registry.unsubscribe(a1, "orders")
    assert registry.targets({"topic": "orders"}) == []
    assert same(registry.targets({"topic": "news"}), [a1])
    assert registry.topics_of[a1] == {"news"}
    registry.unsubscribe(a2, "never-subscribed")  # harmless


def test_targets_is_a_snapshot_list():
    registry, a1, a2, b1 = setup_registry()
    registry.subscribe(a1, "orders")
    for body in ({"broadcast": True}, {"topic": "orders"}, {"user_id": 1}):
        targets = registry.targets(body)
        assert isinstance(targets, list)
        # A socket closing while the message is delivered changes the registry, not the list.
        for socket in targets:
            registry.remove(socket)
        assert targets, body
        for socket in (a1, a2, b1):
            registry.add(socket)
        registry.subscribe(a1, "orders")
