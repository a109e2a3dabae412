"""A three-node RabbitMQ cluster loses a node, and nothing accepted is lost (issue 14).

Black-box: real Daphne and worker processes whose `AMQP_URL` lists the three nodes of a cluster
on this machine (tests/support/rabbit_cluster.py, started once for the module). While the API
publishes to a topic and two sockets echo inbound frames at a steady rate, a node is SIGKILLed:
first the leader of the inbound quorum queue, then the node the web instances are connected
to. Each time publishing and processing resume within 15 s, and the node comes back and rejoins;
at the end every 202 reached each subscribed socket exactly once and every receipt was echoed
exactly once. The cluster tests skip where rabbitmq-server is not installed; the checks of
docker-compose.cluster.yml (schema-validated, as tests/test_deployment.py does for
docker-compose.yml) run everywhere.
"""

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import jsonschema
import pytest
import yaml

from notifications import amqp_nodes, broker
from tests.support.broker import wait_consumers
from tests.support.clients import ApiUser, LiveSocket, open_socket, post_message
from tests.support.processes import free_port
from tests.support.rabbit_cluster import RabbitCluster, RabbitNode, rabbitmq_installed
from tests.support.waiting import eventually

needs_rabbitmq = pytest.mark.skipif(not rabbitmq_installed(), reason="rabbitmq-server is not installed here")

RESUME_WITHIN = 15.0  # seconds from a node's death to publishing and processing again
SETTLE = 60.0  # for what was accepted during an outage to arrive (the sweeper republishes)
PUBLISH_EVERY = 0.1
ECHO_EVERY = 0.2
TOPIC = "cluster-news"
# Topics each socket also subscribes to, so that each instance's queue has this many bindings
# more to restore where it reconnects.
EXTRA_TOPICS = 100


@pytest.fixture(scope="module")
def rabbit_cluster():
    """Three clustered RabbitMQ nodes of this module's own, on ports of their own."""
    cluster = RabbitCluster().start()
    yield cluster
    cluster.stop()


@dataclass
class Post:
    n: int
    web: str
    started: float
    status: int | None = None
    record: dict | None = None
    answered: float | None = None


@dataclass
class Sender:
    """A socket that sends `echo` frames and keeps what came back for each `ref`."""

    name: str
    socket: LiveSocket
    sent: dict[str, float] = field(default_factory=dict)

    def answers(self) -> dict[str, dict]:
        return {frame["ref"]: frame for frame in self.socket.others if frame.get("ref") in self.sent}

    def receipts(self) -> dict[str, str]:
        """{ref: inbound id} of the frames the server said it queued."""
        return {ref: frame["id"] for ref, frame in self.answers().items() if frame["type"] == "receipt"}

    def echoes(self) -> list[str]:
        return [m["payload"]["inbound"] for m in self.socket.messages if m.get("event") == "echo"]


@dataclass
class Load:
    """Publishing through the API and echoing through sockets at a steady rate."""

    http: httpx.AsyncClient
    webs: list
    publisher: ApiUser
    senders: list[Sender]
    posts: list[Post] = field(default_factory=list)
    tasks: set[asyncio.Task] = field(default_factory=set)
    running: bool = True

    def start(self) -> None:
        self.loops = [asyncio.create_task(self._publish()), asyncio.create_task(self._echo())]

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self.loops)
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _publish(self) -> None:
        n = 0
        while self.running:
            web = self.webs[n % len(self.webs)]
            post = Post(n, web.name, time.monotonic())
            self.posts.append(post)
            task = asyncio.create_task(self._post(post, web))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            n += 1
            await asyncio.sleep(PUBLISH_EVERY)

    async def _post(self, post: Post, web) -> None:
        body = {"topic": TOPIC, "event": "tick", "payload": {"n": post.n}}
        try:
            response = await post_message(self.http, web, self.publisher, body)
        except httpx.HTTPError:
            post.status = 0  # no answer: neither accepted nor refused
        else:
            post.status = response.status_code
            if response.status_code == 202:
                post.record = response.json()
        post.answered = time.monotonic()

    async def _echo(self) -> None:
        n = 0
        while self.running:
            for sender in self.senders:
                ref = f"{sender.name}-{n}"
                sender.sent[ref] = time.monotonic()
                await sender.socket.send({"type": "send", "ref": ref, "event": "echo", "payload": {"n": n}})
            n += 1
            await asyncio.sleep(ECHO_EVERY)

    # --- what happened -----------------------------------------------------------------------

    def accepted(self) -> list[Post]:
        return [post for post in self.posts if post.status == 202]

    def published_after(self, moment: float) -> bool:
        """On every web instance, a request made after `moment` was confirmed by the broker
        (202 `published`)."""
        confirmed = {
            post.web
            for post in self.posts
            if post.started > moment and post.record is not None and post.record["status"] == "published"
        }
        return confirmed == {web.name for web in self.webs}

    def echoed_after(self, moment: float) -> bool:
        """For every sending socket, a frame sent after `moment` came back as an echo (so it was
        queued through its instance, processed by a worker, and routed back)."""
        return all(self._echoed_after(sender, moment) for sender in self.senders)

    @staticmethod
    def _echoed_after(sender: Sender, moment: float) -> bool:
        echoed = set(sender.echoes())
        return any(
            sender.sent[ref] > moment and inbound in echoed for ref, inbound in sender.receipts().items()
        )


async def _outage(load: Load, rabbit_cluster: RabbitCluster, victim: RabbitNode, what: str) -> dict:
    """SIGKILL `victim` under load; wait for publishing and processing to resume; restart it.
    The timings, in seconds."""
    await eventually(_async(lambda: load.published_after(time.monotonic() - 2)), 30, "steady publishing")
    clients = [web.name for web in load.webs] + [f"worker-{n}" for n in (1, 2)]
    on_victim = [name for name in clients if victim in rabbit_cluster.connection_nodes(name)]
    killed = time.monotonic()
    await asyncio.to_thread(rabbit_cluster.kill, victim)

    async def resumed(check, label: str) -> float:
        await eventually(
            _async(lambda: check(killed)), RESUME_WITHIN, f"{label} to resume after killing {what}"
        )
        return time.monotonic() - killed

    publishing, processing = await asyncio.gather(
        resumed(load.published_after, "publishing"), resumed(load.echoed_after, "processing")
    )
    # A little steady traffic on the surviving nodes, then the node comes back.
    running = time.monotonic()
    await eventually(
        _async(lambda: load.published_after(running) and load.echoed_after(running)), 30, "traffic"
    )
    restart = time.monotonic()
    await asyncio.to_thread(rabbit_cluster.restart, victim)
    rejoined = time.monotonic() - restart
    return {
        "killed": what,
        "node": victim.name,
        "its clients": on_victim,
        "publishing": round(publishing, 2),
        "processing": round(processing, 2),
        "rejoin": round(rejoined, 1),
    }


def _async(predicate):
    async def check():
        return predicate()

    return check


def _assert_replicated_everywhere(rabbit_cluster: RabbitCluster, namespace: str) -> None:
    everyone = sorted(node.name for node in rabbit_cluster.nodes)
    for queue in (f"{namespace}.inbound", f"{namespace}.inbound.dead"):
        assert sorted(rabbit_cluster.queue_members(queue)) == everyone, queue
    retries = [
        name for name in rabbit_cluster.queue_leaders() if name.startswith(f"{namespace}.inbound.retry.")
    ]
    assert retries
    for queue in retries:
        assert sorted(rabbit_cluster.queue_members(queue)) == everyone, queue


@needs_rabbitmq
async def test_a_killed_node_loses_no_accepted_message_and_no_receipt(cluster, users, rabbit_cluster):
    cluster.extra_env |= {
        "AMQP_URL": rabbit_cluster.amqp_url,
        "RT_SWEEP_GRACE_SECONDS": "2",
        "RT_SOCKET_RATE": "1000",  # the subscribes below come all at once
        "RT_MAX_SUBSCRIPTIONS": str(EXTRA_TOPICS + 1),
    }
    web_1, web_2 = cluster.add_web(), cluster.add_web()
    cluster.add_worker(concurrency=2)
    cluster.add_worker(concurrency=2)
    for web in (web_1, web_2):
        await asyncio.to_thread(web.wait_ready)
    inbound = f"{cluster.namespace}.inbound"
    await asyncio.to_thread(wait_consumers, inbound, 2, cluster.workers, rabbit_cluster.urls[0])
    # The inbound, retry and dead-letter queues are quorum queues with a replica on every node;
    # the instances' own queues are transient classic queues, declared again wherever their
    # instance reconnects (notifications/broker.py `declare_instance_queue`).
    _assert_replicated_everywhere(rabbit_cluster, cluster.namespace)
    queues = rabbit_cluster.queues("type", "durable")
    for web in (web_1, web_2):
        assert queues[f"{cluster.namespace}.instance.{web.name}"] == ["classic", "false"]
    assert queues[inbound] == ["quorum", "true"]

    timings = []
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web_1, users["bob"])
        carol = await open_socket(http, web_2, users["carol"])
        extra = [f"extra-{n}" for n in range(EXTRA_TOPICS)]
        for listener in (bob, carol):
            answer = await listener.request({"type": "subscribe", "topic": TOPIC}, "subscribed")
            assert answer["type"] == "subscribed", answer
            for topic in extra:
                await listener.send({"type": "subscribe", "topic": topic})
        for listener in (bob, carol):
            await listener.wait_for(
                lambda s: {f.get("topic") for f in s.others if f["type"] == "subscribed"} >= set(extra),
                timeout=60,
                what="the extra subscriptions",
            )
        senders = [Sender("bob", bob), Sender("carol", carol)]
        load = Load(http, [web_1, web_2], users["alice"], senders)
        load.start()
        try:
            leader = rabbit_cluster.node(rabbit_cluster.queue_leaders()[inbound])
            timings.append(await _outage(load, rabbit_cluster, leader, "the leader of the inbound queue"))
            _assert_replicated_everywhere(rabbit_cluster, cluster.namespace)

            held = [node for web in (web_1, web_2) for node in rabbit_cluster.connection_nodes(web.name)]
            assert held, "the web instances hold no connection the cluster knows of"
            target = Counter(node.name for node in held).most_common(1)[0][0]
            timings.append(
                await _outage(
                    load, rabbit_cluster, rabbit_cluster.node(target), "the node the web instances use"
                )
            )
        finally:
            await load.stop()
        print("\ncluster outages:", *timings, sep="\n  ")

        # The bindings of every topic came back wherever the instances reconnected.
        for topic in (extra[0], extra[-1]):
            last = await post_message(http, web_1, users["alice"], {"topic": topic, "event": "last"})
            assert last.status_code == 202, last.text
            for listener in (bob, carol):
                await listener.wait_for(
                    lambda s, wanted=last.json()["id"]: wanted in {m["id"] for m in s.messages},
                    timeout=SETTLE,
                    what=f"a message to {topic}",
                )

        # Every accepted message reached both subscribed sockets exactly once.
        accepted = {post.record["id"]: post.n for post in load.accepted() if post.record is not None}
        assert accepted
        unanswered = {post.n for post in load.posts if post.status != 202}
        for listener in (bob, carol):
            try:
                await listener.wait_for(
                    lambda s: accepted.keys() <= {m["id"] for m in s.messages if m.get("topic") == TOPIC},
                    timeout=SETTLE,
                    what="every accepted message",
                )
            except TimeoutError:
                raise AssertionError(
                    _what_is_missing(listener, load, accepted, rabbit_cluster, (web_1, web_2))
                ) from None
        # A few more seconds for a duplicate to show, bounded by a last message after them all.
        marker = await post_message(http, web_2, users["alice"], {"topic": TOPIC, "event": "end"})
        assert marker.status_code == 202, marker.text
        for listener in (bob, carol):
            await listener.wait_for(
                lambda s: marker.json()["id"] in {m["id"] for m in s.messages},
                timeout=SETTLE,
                what="the marker",
            )
            ticks = [m for m in listener.messages if m.get("topic") == TOPIC and m["event"] == "tick"]
            counts = Counter(m["id"] for m in ticks)
            assert [key for key, count in counts.items() if count > 1] == [], "a message arrived twice"
            # Refused (503) or unanswered requests may have gone out all the same; nothing else did.
            extra = {m["payload"]["n"] for m in ticks if m["id"] not in accepted}
            assert extra <= unanswered

        # Every receipt was processed, and echoed exactly once; nothing else was echoed.
        for sender in senders:
            await sender.socket.wait_for(
                lambda s, sender=sender: sender.answers().keys() == sender.sent.keys(),
                timeout=SETTLE,
                what=f"an answer to each of {sender.name}'s frames",
            )
            receipts = set(sender.receipts().values())
            assert receipts
            await sender.socket.wait_for(
                lambda s, receipts=receipts, sender=sender: receipts <= set(sender.echoes()),
                timeout=SETTLE,
                what=f"{sender.name}'s echoes",
            )
            echoes = Counter(sender.echoes())
            assert [key for key, count in echoes.items() if count > 1] == [], (
                "an inbound frame was echoed twice"
            )
            assert set(echoes) == receipts
            refused = [f for f in sender.answers().values() if f["type"] == "error"]
            assert all(f["code"] == "unavailable" for f in refused), refused
            user = users[sender.name]
            for inbound_id in receipts:
                record = await http.get(f"{web_1.url}/api/v1/inbound/{inbound_id}/", headers=user.headers)
                assert record.json()["status"] == "processed", record.text

        assert bob.closed_code is None and carol.closed_code is None, "sockets stay open through a node loss"
        await bob.close()
        await carol.close()
    for timing in timings:
        assert timing["publishing"] <= RESUME_WITHIN and timing["processing"] <= RESUME_WITHIN, timing


@needs_rabbitmq
async def test_a_process_skips_a_dead_node_and_moves_to_the_next_when_it_loses_its_own(
    rabbit_cluster, settings, monkeypatch
):
    """In-process: `broker.connect` with a node that answers nothing listed first, then a lost
    connection: the next node, with the queue, binding and consumer restored there."""
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    settings.AMQP_URL = ",".join([dead, *rabbit_cluster.urls])
    settings.RT_INSTANCE_ID = f"failover-{free_port()}"
    monkeypatch.setattr(amqp_nodes, "random_start", lambda count: 0)
    connection = await broker.connect()
    assert isinstance(connection, amqp_nodes.FailoverConnection)
    try:
        assert connection.node == amqp_nodes.redact_one(rabbit_cluster.urls[0])
        topology = broker.Topology(f"failover-{free_port()}")
        channel = await connection.channel()
        queue = await broker.declare_instance_queue(channel, topology, settings.RT_INSTANCE_ID)
        received: asyncio.Queue = asyncio.Queue()

        async def on_message(message) -> None:
            received.put_nowait(message.body)

        await queue.consume(on_message, no_ack=True, exclusive=True)
        publisher = await connection.channel(publisher_confirms=True)
        broadcast = await broker.declare_broadcast(publisher, topology)
        await broker.publish(broadcast, {"n": 1}, message_id="1")
        assert await asyncio.wait_for(received.get(), 10) == b'{"n":1}'

        reconnected = asyncio.Event()

        async def on_reconnect(*args) -> None:
            reconnected.set()

        connection.reconnect_callbacks.add(on_reconnect)
        assert connection.transport is not None
        await connection.transport.connection.close()  # as a lost node would, seen from here
        await asyncio.wait_for(reconnected.wait(), amqp_nodes.SETTLE_DELAY + 10)
        assert connection.node == amqp_nodes.redact_one(rabbit_cluster.urls[1])
        assert rabbit_cluster.connection_nodes(settings.RT_INSTANCE_ID) == [rabbit_cluster.nodes[1]]
        await broker.publish(broadcast, {"n": 2}, message_id="2")
        assert await asyncio.wait_for(received.get(), 10) == b'{"n":2}'
        await queue.delete(if_unused=False)
        await publisher.exchange_delete(topology.broadcast_exchange)
    finally:
        await connection.close()


# --- docker-compose.cluster.yml -------------------------------------------------------------

COMPOSE_COOKIE = {"RABBITMQ_ERLANG_COOKIE": "an-erlang-cookie-for-the-schema-check"}


def merge_compose(base, override, key=None):
    """`docker compose -f base -f override`, for what these files use: mappings merge key by key,
    a service's `volumes` and `ports` are united (by container path), other values are replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = merge_compose(base[name], value, name) if name in base else value
        return merged
    if key in ("volumes", "ports") and isinstance(base, list) and isinstance(override, list):
        target = {str(entry).split(":")[1] if ":" in str(entry) else str(entry): entry for entry in base}
        target |= {str(entry).split(":")[1] if ":" in str(entry) else str(entry): entry for entry in override}
        return list(target.values())
    return override


@pytest.fixture(scope="module")
def cluster_compose():
    """docker-compose.yml with docker-compose.cluster.yml, as `docker compose config` would see
    them with .env.example (and an Erlang cookie) as .env."""
    from tests.support.processes import ROOT
    from tests.test_deployment import interpolate, read_env_file

    env = read_env_file(ROOT / ".env.example") | COMPOSE_COOKIE
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    override = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
    return interpolate(merge_compose(base, override), env), env


def test_the_cluster_compose_file_validates_against_the_compose_specification(cluster_compose):
    from tests.test_deployment import DATA

    compose, _ = cluster_compose
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # The check is not vacuous: what docker compose refuses, it refuses.
    broken = json.loads(json.dumps(compose))
    broken["services"]["rabbitmq-2"]["depends_on"] = {"rabbitmq": {"condition": "service_finished"}}
    assert any("service_finished" in e.message for e in validator.iter_errors(broken))


def test_the_cluster_compose_file_runs_three_nodes_and_the_app_lists_them(cluster_compose):
    from tests.support.processes import ROOT

    compose, env = cluster_compose
    services = compose["services"]
    nodes = ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
    conf = (ROOT / "deploy" / "rabbitmq-cluster.conf").read_text()
    for name in nodes:
        node = services[name]
        assert node["hostname"] == name, "RabbitMQ's data lives under its node (host) name"
        assert node["image"] == services["rabbitmq"]["image"]
        assert node["environment"]["RABBITMQ_ERLANG_COOKIE"] == COMPOSE_COOKIE["RABBITMQ_ERLANG_COOKIE"]
        assert node["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "check_running"]
        mounts = {entry.split(":")[1]: entry.split(":")[0] for entry in node["volumes"]}
        assert mounts["/etc/rabbitmq/conf.d/20-cluster.conf"] == "./deploy/rabbitmq-cluster.conf"
        assert f"= rabbit@{name}\n" in conf
    data = {services[name]["volumes"][0].split(":")[0] for name in nodes}
    assert data == {"rabbitmq-data", "rabbitmq-2-data", "rabbitmq-3-data"}, "a data volume each"
    assert data <= compose["volumes"].keys()
    assert "ports" not in services["rabbitmq-2"] and "ports" not in services["rabbitmq-3"]

    for name in ("migrate", "web", "worker"):
        app = services[name]
        urls = amqp_nodes.parse(app["environment"]["AMQP_URL"])
        user, password = env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"]
        assert urls == [f"amqp://{user}:{password}@{node}:5672/" for node in nodes], name
        assert app["environment"] == services["web"]["environment"], "the same settings everywhere"
    for name in ("web", "worker"):
        for node in nodes:
            assert services[name]["depends_on"][node]["condition"] == "service_healthy", (name, node)
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_the_cluster_compose_file_refuses_to_start_without_a_cookie(cluster_compose):
    from tests.support.processes import ROOT
    from tests.test_deployment import interpolate, read_env_file

    override = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
    with pytest.raises(ValueError, match="RABBITMQ_ERLANG_COOKIE"):
        interpolate(override, read_env_file(ROOT / ".env.example"))


def _what_is_missing(listener, load, accepted, rabbit_cluster, webs) -> str:
    """For a failure: which accepted messages a socket lacks (seqs and statuses), the last seq it
    got, and where the instances' queues and connections are now."""
    got = {m["id"]: m.get("seq") for m in listener.messages if m.get("topic") == TOPIC}
    records = {post.record["id"]: post.record for post in load.accepted() if post.record is not None}
    missing = [(records[i]["seq"], records[i]["status"]) for i in accepted if i not in got]
    seqs = [seq for seq in got.values() if isinstance(seq, int)]
    queues = {
        name: row
        for name, row in rabbit_cluster.queues("messages", "consumers", "pid").items()
        if ".instance." in name
    }
    connections = {
        web.name: [node.name for node in rabbit_cluster.connection_nodes(web.name)] for web in webs
    }
    bound = rabbit_cluster.bindings_of(f"topic.{TOPIC}")
    return (
        f"{listener.welcome.get('instance')}: {len(missing)} accepted messages missing, first "
        f"{sorted(missing)[:5]}; last seq got {max(seqs, default=None)}; instance queues {queues}; "
        f"connections {connections}; queues bound to topic.{TOPIC} {bound}"
    )
