"""The admin's overview (/admin/overview/), the workers' metrics port, the Grafana dashboard and the
Prometheus config (issue 16). The page in Chromium is in tests/test_browser.py."""

import asyncio
import datetime
import json
import re
import socket
import time

import aio_pika
import httpx
import pytest
import yaml
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from notifications import admin_overview, overview
from notifications.broker import Topology, declare_instance_queue, declare_topology
from notifications.models import Delivery, InboundFrame, InstanceLease, Message
from tests.support.broker import delete_namespace_sync, queue_stats
from tests.support.processes import ROOT, free_port, worker_argv
from tests.support.waiting import wait_until

OVERVIEW = "/admin/overview/"
PARTS = "/admin/overview/parts/"
REQUEUE = "/admin/overview/requeue/"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "realtime.json"


@pytest.fixture(autouse=True)
def _fresh_caches():
    overview._depths_cache.clear()
    overview._rates_cache.clear()
    yield
    overview._depths_cache.clear()
    overview._rates_cache.clear()


@pytest.fixture
def staff(db):
    return User.objects.create_user("ops", password="x", is_staff=True)


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


def lease(instance: str, kind: str, *, renewed_ago: float = 1.0, ttl: float = 10.0, **stats) -> InstanceLease:
    now = timezone.now()
    renewed = now - datetime.timedelta(seconds=renewed_ago)
    return InstanceLease.objects.create(
        instance=instance,
        kind=kind,
        started_at=now - datetime.timedelta(minutes=5),
        renewed_at=renewed,
        expires_at=renewed + datetime.timedelta(seconds=ttl),
        stats=stats,
    )


def parts(client) -> dict:
    response = client.get(PARTS)
    assert response.status_code == 200, response.content
    assert response["Cache-Control"].startswith("max-age=0")
    return response.json()


# --- who may see it ------------------------------------------------------------------------


def test_the_admin_index_links_to_the_overview(client, db):
    client.force_login(User.objects.create_superuser("root", password="x"))
    assert reverse("admin:overview") == OVERVIEW
    index = client.get("/admin/").content.decode()
    assert f'href="{OVERVIEW}"' in index
    # The admin's own index is still there around it.
    assert "Inbound frames" in index


@pytest.mark.parametrize("who", ["anonymous", "bob"])
def test_non_staff_get_the_admin_sign_in_or_403(client, db, who):
    if who == "bob":
        client.force_login(User.objects.create_user("bob", password="x"))
    page = client.get(OVERVIEW)
    assert page.status_code == 302
    assert page["Location"] == f"/admin/login/?next={OVERVIEW}"
    data = client.get(PARTS)
    assert data.status_code == 403 and "detail" in data.json()
    posted = client.post(REQUEUE, {"frame": "x"})
    assert posted.status_code == 302 and posted["Location"].startswith("/admin/login/")


def test_an_inactive_staff_user_is_refused(client, staff):
    client.force_login(staff)
    User.objects.filter(pk=staff.pk).update(is_active=False)
    assert client.get(PARTS).status_code == 403


# --- instances and workers -----------------------------------------------------------------


def test_instances_and_workers_from_their_leases(staff_client, settings):
    settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # the broker plays no part here
    lease("web-1", "web", sockets=12, subscriptions=30, streams=7, messages_received=450, deliveries=900)
    lease("web-2", "web", renewed_ago=8.0, sockets=3)  # two renewals missed, lease still valid
    lease("web-3", "web", renewed_ago=12.0, sockets=99)  # lapsed, not yet removed by a live one
    lease("worker-1", "worker", lanes=4, waiting=1, processed=120.0, failed=3.0, dead=1.0)

    html = staff_client.get(OVERVIEW).content.decode()
    for instance, state in [("web-1", "up"), ("web-2", "late"), ("web-3", "gone"), ("worker-1", "up")]:
        assert re.search(rf'data-instance="{instance}" data-kind="\w+" data-state="{state}"', html), instance
    assert '<td class="num" data-stat="sockets">12</td>' in html
    assert '<td class="num" data-stat="messages_received">450</td>' in html
    # Counters kept as floats show as whole numbers.
    assert '<td class="num" data-stat="processed">120</td>' in html

    data = parts(staff_client)
    states = {p["instance"]: p["state"] for p in data["data"]["processes"]}
    assert states == {"web-1": "up", "web-2": "late", "web-3": "gone", "worker-1": "up"}
    summary = data["parts"]["summary"]
    # Live web instances (up or late) and their sockets: web-3's lease lapsed.
    assert '<span class="rt-figure" id="summary-webs">2</span>' in summary
    assert '<span class="rt-figure" id="summary-sockets">15</span>' in summary
    assert set(data["parts"]) == set(admin_overview.PARTS)


def test_a_lease_without_counters_still_shows(staff_client, settings):
    settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    InstanceLease.objects.create(
        instance="odd",
        kind="web",
        started_at=timezone.now(),
        renewed_at=timezone.now(),
        expires_at=timezone.now() + datetime.timedelta(seconds=10),
        stats=["not", "a", "dict"],
    )
    assert 'data-instance="odd"' in staff_client.get(OVERVIEW).content.decode()


# --- queue depths --------------------------------------------------------------------------


async def _declare_and_fill(namespace: str, dead: int, retry: int) -> None:
    topology = Topology(namespace)
    connection = await aio_pika.connect(_amqp_url())
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, topology)
        for n in range(dead):
            await channel.default_exchange.publish(
                aio_pika.Message(b'{"n": %d}' % n), routing_key=topology.dead_queue
            )
        for n in range(retry):
            await channel.default_exchange.publish(
                aio_pika.Message(b'{"n": %d}' % n), routing_key=topology.retry_queue(8)
            )
    finally:
        await connection.close()


def _amqp_url() -> str:
    from django.conf import settings

    return settings.AMQP_URL


def test_queue_depths_are_what_the_broker_says(staff_client, namespace):
    topology = Topology(namespace)
    try:
        # Before any process declared them: shown as such, not as an error.
        before = parts(staff_client)["data"]["broker"]
        assert before["available"] and all(q["messages"] is None for q in before["queues"])
        assert "not declared yet" in staff_client.get(OVERVIEW).content.decode()

        asyncio.run(_declare_and_fill(namespace, dead=7, retry=2))
        overview._depths_cache.clear()
        data = parts(staff_client)["data"]["broker"]
        shown = {q["name"]: q["messages"] for q in data["queues"]}
        expected = [topology.inbound_queue] + [topology.retry_queue(d) for d in (1, 2, 4, 8)]
        assert list(shown) == expected + [topology.dead_queue]
        for name in shown:
            stats = asyncio.run(queue_stats(name))
            assert stats is not None and shown[name] == stats[0], name
        assert shown[topology.dead_queue] == 7 and shown[topology.retry_queue(8)] == 2
        assert shown[topology.inbound_queue] == 0
        html = parts(staff_client)["parts"]["queues"]
        assert f'data-queue="{topology.dead_queue}" data-role="dead"' in html
        assert 'data-messages="7"' in html
    finally:
        delete_namespace_sync(namespace, [])


def test_a_live_web_instance_shows_its_own_queue(staff_client, namespace):
    lease("web-9", "web", sockets=1)
    assert '<td class="num" data-stat="queue">–</td>' in staff_client.get(OVERVIEW).content.decode()

    async def backlog_of_two() -> None:
        connection = await aio_pika.connect(_amqp_url())
        try:
            channel = await connection.channel(publisher_confirms=True)
            queue = await declare_instance_queue(channel, Topology(namespace), "web-9")
            for _ in range(2):
                await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue.name)
        finally:
            await connection.close()

    try:
        asyncio.run(backlog_of_two())
        depths = overview.queue_depths(["web-9"], fresh=True)
        assert depths.available
        assert (depths.queues[-1].name, depths.queues[-1].role) == (f"{namespace}.instance.web-9", "instance")
        assert depths.queues[-1].messages == 2
        overview._depths_cache.clear()
        html = staff_client.get(OVERVIEW).content.decode()
        assert '<td class="num" data-stat="queue">2</td>' in html
        # The instance queues show with their instance, not in the table of inbound queues.
        assert f'data-queue="{namespace}.instance.web-9"' not in html
    finally:
        delete_namespace_sync(namespace, ["web-9"])


def test_a_broker_that_refuses_shows_unavailable_and_the_page_still_works(staff_client, settings):
    settings.AMQP_URL = f"amqp://guest:secret-pw@127.0.0.1:{free_port()}/"
    lease("web-1", "web", sockets=2)
    started = time.monotonic()
    page = staff_client.get(OVERVIEW)
    assert time.monotonic() - started < overview.BROKER_TIMEOUT + 2
    html = page.content.decode()
    assert page.status_code == 200
    assert 'id="broker-unavailable"' in html and "Broker unavailable" in html
    assert "secret-pw" not in html
    assert 'data-instance="web-1"' in html  # the rest of the page is there
    data = parts(staff_client)["data"]["broker"]
    assert data["available"] is False and data["error"].startswith("broker unavailable")


def test_a_broker_that_never_answers_is_given_up_on_within_the_timeout(staff_client, settings):
    """A node that takes the TCP connection and then says nothing (hung, or a black hole)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/"
        started = time.monotonic()
        data = parts(staff_client)["data"]["broker"]
        elapsed = time.monotonic() - started
    assert data["available"] is False
    assert f"no answer within {overview.BROKER_TIMEOUT:g} s" in data["error"]
    assert elapsed < overview.BROKER_TIMEOUT + 2


def test_broker_nodes_of_a_cluster_url():
    url = "amqp://u:p,w@a:5672/, amqp://u:p@b:5672/,amqps://u:p@c/"
    assert overview.broker_nodes(url) == ["amqp://u:p,w@a:5672/", "amqp://u:p@b:5672/", "amqps://u:p@c/"]


def test_the_next_node_is_tried_when_the_first_is_down(staff_client, settings, namespace):
    settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}/,{_amqp_url()}"
    data = parts(staff_client)["data"]["broker"]  # passive declares: nothing to clean up
    assert data["available"], data["error"]


# --- rates ---------------------------------------------------------------------------------


def test_rates_per_minute_over_the_last_hour(staff_client, settings):
    settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    now = timezone.now().replace(second=30, microsecond=0)
    minute = datetime.timedelta(minutes=1)

    def message(at: datetime.datetime, published: datetime.datetime | None) -> Message:
        record = Message.objects.create(topic="t", status="published" if published else "accepted")
        Message.objects.filter(pk=record.pk).update(created_at=at, published_at=published)
        return record

    recent = [message(now - 3 * minute, now - 3 * minute) for _ in range(4)]
    message(now, now)
    message(now - 2 * minute, None)  # never confirmed: not published
    message(now - 90 * minute, now - 90 * minute)  # older than the hour
    for record in recent[:3]:
        Delivery.objects.create(
            message=record, connection=f"c-{record.pk}", instance="web-1", delivered_at=now - 3 * minute
        )
    Delivery.objects.filter(connection__in=[f"c-{r.pk}" for r in recent[:2]]).update(
        acked_at=now - 2 * minute
    )

    series = {s.name: s for s in overview.rates(now)}
    assert len(series["published"].counts) == overview.RATE_MINUTES
    assert series["published"].counts[-4] == 4 and series["published"].counts[-1] == 1
    assert series["published"].total == 5
    assert series["delivered"].counts[-4] == 3 and series["delivered"].total == 3
    assert series["acked"].counts[-3] == 2 and series["acked"].total == 2

    html = parts(staff_client)["parts"]["rates"]
    assert html.count("<svg") == 3
    assert re.search(r'<figure class="rt-chart" data-series="published" data-total="5">', html)
    assert "<rect" in html and ": 4</title>" in html


def test_a_chart_of_an_empty_hour_draws_no_bar():
    now = timezone.now()
    minutes = [now - datetime.timedelta(minutes=n) for n in range(60, 0, -1)]
    empty = admin_overview.chart(overview.Series("acked", "Acked", minutes, [0] * 60))
    assert empty.peak == 0 and all(bar.height == 0 for bar in empty.bars)
    some = admin_overview.chart(overview.Series("acked", "Acked", minutes, [1000] + [1] * 59))
    assert some.bars[0].height == admin_overview.CHART_HEIGHT - 2
    assert all(bar.height >= 1 for bar in some.bars)  # a minute with any message shows


# --- dead frames ---------------------------------------------------------------------------


@pytest.fixture
def dead_frames(db):
    bob = User.objects.create_user("bob")
    frames = [
        InboundFrame.objects.create(
            user=bob,
            event="diag.fail",
            payload={"n": n},
            status="dead",
            attempts=5,
            error=f"RuntimeError: boom {n} <script>window.__x=1</script>",
            processed_at=timezone.now() - datetime.timedelta(seconds=n),
        )
        for n in range(3)
    ]
    InboundFrame.objects.create(user=bob, event="echo", status="processed")
    return frames


def test_dead_frames_with_their_errors(staff_client, dead_frames, settings):
    settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    html = staff_client.get(OVERVIEW).content.decode()
    rows = re.findall(r'<tr data-frame="([0-9a-f-]+)">', html)
    assert rows == [str(f.pk) for f in dead_frames]  # latest death first
    assert "RuntimeError: boom 0 &lt;script&gt;" in html and "<script>window.__x" not in html
    assert reverse("admin:notifications_inboundframe_change", args=[dead_frames[0].pk]) in html
    assert "/admin/notifications/inboundframe/?status__exact=dead" in html
    assert '<span class="rt-figure rt-warn" id="summary-dead-frames">3</span>' in html
    # Staff without the change permission: no requeue button, and a POST is refused.
    assert "Requeue" not in html and "requeueing needs the permission" in html
    refused = staff_client.post(REQUEUE, {"frame": str(dead_frames[0].pk)})
    assert refused.status_code == 403
    assert InboundFrame.objects.get(pk=dead_frames[0].pk).status == "dead"


class RecordingPublisher:
    def __init__(self) -> None:
        self.inbound: list[str] = []

    async def publish_inbound(self, body, message_id: str) -> None:
        self.inbound.append(message_id)

    async def publish_message(self, body, message_id: str, key: str) -> None:
        raise AssertionError("requeueing publishes no message")


def test_requeue_from_the_overview_needs_the_change_permission(
    staff_client, staff, dead_frames, publisher, settings
):
    settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    staff.user_permissions.add(Permission.objects.get(codename="change_inboundframe"))
    recording = RecordingPublisher()
    publisher(recording)
    html = staff_client.get(OVERVIEW).content.decode()
    assert html.count('class="rt-requeue"') == 3 and "Requeue the 3 shown" in html

    first = dead_frames[0]
    response = staff_client.post(REQUEUE, {"frame": [str(first.pk), "not-a-uuid"]}, follow=True)
    assert response.redirect_chain[-1][0] == f"{OVERVIEW}#dead"
    assert "Requeued 1 dead frame(s)." in response.content.decode()
    assert recording.inbound == [str(first.pk)]
    first.refresh_from_db()
    assert first.status == "accepted" and first.attempts == 0
    # Again: it is not dead any more, nothing is published twice.
    again = staff_client.post(REQUEUE, {"frame": str(first.pk)}, follow=True)
    assert "Nothing requeued" in again.content.decode() and recording.inbound == [str(first.pk)]
    assert staff_client.get(REQUEUE).status_code == 405


def test_requeue_with_the_broker_down_keeps_the_frame_dead(staff_client, staff, dead_frames, publisher):
    staff.user_permissions.add(Permission.objects.get(codename="change_inboundframe"))
    # The `publisher` fixture leaves none installed: publishing is BrokerUnavailable.
    response = staff_client.post(REQUEUE, {"frame": str(dead_frames[1].pk)}, follow=True)
    assert "Stopped requeueing" in response.content.decode()
    assert InboundFrame.objects.get(pk=dead_frames[1].pk).status == "dead"


# --- the database down: each part fails alone ----------------------------------------------


def test_a_part_that_cannot_be_read_leaves_the_others(staff_client, settings, monkeypatch):
    settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    lease("web-1", "web", sockets=1)

    def broken():
        raise RuntimeError("statement timeout")

    monkeypatch.setattr(overview, "cached_rates", broken)
    html = staff_client.get(OVERVIEW).content.decode()
    assert "The rates could not be read: RuntimeError: statement timeout" in html
    assert 'data-instance="web-1"' in html


# --- the workers' metrics port -------------------------------------------------------------


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_run_workers_refuses_a_bad_metrics_port(port):
    with pytest.raises(CommandError, match="--metrics-port"):
        call_command("run_workers", "--metrics-port", port)


def scrape(url: str) -> dict[str, list]:
    """Sample name -> samples of a Prometheus text page."""
    samples: dict[str, list] = {}
    text = httpx.get(url, timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (labels, ranges, functions and keywords aside)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped))
    promql = {
        "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "delta", "histogram_quantile",
        "clamp_min", "clamp_max", "topk", "bottomk", "abs", "time", "vector", "scalar", "or", "and",
        "unless", "offset", "bool", "label_replace", "absent", "changes", "resets", "deriv", "max_over_time",
        "min_over_time", "avg_over_time", "last_over_time",
    }  # fmt: skip
    return {word for word in words if word not in promql and not word.startswith("$")}


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [target["expr"] for target in inner.get("targets", []) if target.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        match = re.match(r"label_values\((\w+)", query or "")
        if match:
            exprs.append(match.group(1))
    return exprs


def test_the_dashboard_names_only_metrics_that_a_web_instance_or_worker_serves(cluster, users):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 10
    named = set().union(*(metric_names_in(expr) for expr in exprs))
    # The contract's three, at least.
    assert {"rt_connections", "rt_messages_received_total", "rt_deliveries_total"} <= named

    web = cluster.add_web()
    metrics_port = free_port()
    worker = cluster._proc(
        "worker-1", [*worker_argv(2), "--metrics-port", str(metrics_port)], metrics_port, {}
    )
    cluster.workers.append(worker)
    web.wait_ready()
    cluster.wait_workers_consuming(1)
    worker_url = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_until(lambda: _answers(worker_url), timeout=15, what="the worker's metrics port")

    served_by_web = scrape(f"{web.url}/metrics")
    served_by_worker = scrape(worker_url)
    missing = named - set(served_by_web) - set(served_by_worker)
    assert not missing, f"the dashboard names metrics nobody serves: {sorted(missing)}"
    # The worker's counters carry its RT_INSTANCE_ID, as the web instance's do.
    for name in ("rt_inbound_processed_total", "rt_inbound_failed_total", "rt_inbound_dead_total"):
        assert [s.labels for s in served_by_worker[name]] == [{"instance": "worker-1"}]
    assert [s.labels for s in served_by_web["rt_connections"]] == [{"instance": "web-1"}]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_prometheus_and_grafana_configs_fit_together():
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert {"web", "worker"} <= set(jobs)
    for name in ("web", "worker"):
        # The processes' own `instance` label (RT_INSTANCE_ID) wins over the scrape target's.
        assert jobs[name]["honor_labels"] is True

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name].get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    worker_command = " ".join(services["worker"]["command"])
    assert "--metrics-port" in worker_command
    # Everything else runs without the profile, as before.
    assert [name for name, service in services.items() if "profiles" not in service] == [
        "rabbitmq", "postgres", "migrate", "web", "worker", "nginx"
    ]  # fmt: skip

    datasources = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uids = {source["uid"] for source in datasources["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if isinstance(target.get("datasource"), dict)
    }
    assert used and used <= uids
    providers = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "realtime.yml").read_text()
    )
    assert providers["providers"][0]["options"]["path"]


def test_the_dashboard_has_no_duplicate_panel_ids_and_fits_the_grid():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


@pytest.mark.parametrize("path", ["overview.js", "overview.css"])
def test_the_page_assets_are_served_from_static_files(client, path):
    response = client.get(f"/static/notifications/{path}")
    assert response.status_code == 200
    body = b"".join(response.streaming_content).decode()
    assert "http://" not in body and "https://" not in body  # nothing from a CDN


def test_the_readme_says_where_the_overview_is():
    text = (ROOT / "README.md").read_text()
    assert "/admin/overview/" in text and "--metrics-port" in text
