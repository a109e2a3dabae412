"""The live page (/) in headless Chromium against real Daphne instances, RabbitMQ and workers.

The browser tests use Playwright's sync API in sync tests: the `cluster` fixture is sync, and
Chromium is started after the deployment and stopped before it (Playwright's sync API keeps an
event loop running, and the cluster's own helpers call `asyncio.run`).
"""

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from django.urls import reverse

from tests.support.clients import publish_sync
from tests.support.processes import ROOT
from tests.support.waiting import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
# Milliseconds Playwright waits for the page to show something (a message crosses two processes
# and the broker; a restarted instance needs a few seconds before it takes sockets again).
SHOW_MS = 15_000
RECONNECT_MS = 45_000
XSS = "<img src=x onerror=alert(1)><script>window.__xss=1</script>"


# --- plain tests (Django's test client, no browser) ------------------------------------------


def test_index_redirects_anonymous_users_to_login(client):
    response = client.get(reverse("index"))
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next=/"


def test_index_renders_for_a_signed_in_user(client, users, settings):
    from django.contrib.auth.models import User

    client.force_login(User.objects.get(username="bob"))
    response = client.get(reverse("index"))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="realtime-config"' in html
    assert "/static/notifications/realtime.js" in html and "/static/notifications/live.js" in html
    assert "/static/notifications/site.css" in html
    assert response.context["realtime_config"]["user"] == "bob"
    assert settings.RT_INSTANCE_ID in html


def test_login_page_and_logout(client, users):
    page = client.get(reverse("login"))
    assert page.status_code == 200
    assert b'name="username"' in page.content and b'name="password"' in page.content
    signed_in = client.post(reverse("login"), {"username": "bob", "password": users["bob"].password})
    assert signed_in.status_code == 302 and signed_in["Location"] == "/"
    wrong = client.post(reverse("login"), {"username": "bob", "password": "nope"})
    assert wrong.status_code == 200 and b'role="alert"' in wrong.content
    signed_out = client.post(reverse("logout"))
    assert signed_out.status_code == 302 and signed_out["Location"] == reverse("login")
    assert client.get(reverse("index")).status_code == 302


@pytest.mark.parametrize("name", ["realtime.js", "live.js", "site.css"])
def test_static_files_are_served_without_collectstatic(client, name):
    response = client.get(f"/static/notifications/{name}")
    assert response.status_code == 200
    assert b"".join(response.streaming_content)


# --- browser tests ----------------------------------------------------------------------------


def require_chromium() -> None:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium); browser tests need it")


@contextmanager
def chromium():
    """Headless Chromium from the system (Playwright's own download cannot work here)."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def deployment(cluster, users):
    """Two web instances and a worker, ready before the browser starts."""
    require_chromium()  # skip before paying for processes that would go unused
    web_a, web_b = cluster.add_web(), cluster.add_web()
    cluster.add_worker()
    web_a.wait_ready()
    web_b.wait_ready()
    cluster.wait_workers_consuming()
    return web_a, web_b


@pytest.fixture
def browser(deployment):
    """Chromium for pages on the deployment, torn down before the deployment it depends on."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def bare_browser():
    """Chromium alone, for the client library against a scripted fake socket."""
    with chromium() as launched:
        yield launched


class PageWatch:
    """Collects what must never happen on a page: script errors and dialogs (alert from a payload)."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def open_live_page(browser, web, user, login_shot: str | None = None):
    """Sign in through the form, as a person would, and land on the live page."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watch = PageWatch(page)
    page.goto(f"{web.url}/")
    expect(page).to_have_url(f"{web.url}/accounts/login/?next=/")
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(user.password)
    if login_shot:
        screenshot(page, login_shot)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{web.url}/")
    return page, watch


def expect_connected(page, instance: str, timeout: int = SHOW_MS) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#rt-state")).to_have_attribute("data-state", "open", timeout=timeout)
    expect(page.locator("#rt-state")).to_have_text("Connected")
    expect(page.locator("#rt-instance")).to_have_text(instance, timeout=timeout)


def shown(page, message_id: str):
    return page.locator(f'#messages li[data-id="{message_id}"]')


def wait_for_ack(web, publisher, message_id: str) -> dict:
    """Poll the delivery log until the page's ack is recorded (written in batches, off the hot path)."""

    def acked():
        response = httpx.get(
            f"{web.url}/api/v1/messages/{message_id}/", headers=publisher.headers, timeout=10
        )
        assert response.status_code == 200, response.text
        deliveries = response.json()["deliveries"]
        return deliveries if deliveries and deliveries[0]["acked_at"] else None

    return wait_until(acked, timeout=15, interval=0.1, what=f"the ack of {message_id}")


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.mark.browser
def test_page_shows_acks_escapes_and_survives_a_restart(cluster, deployment, browser, users):
    from playwright.sync_api import expect

    web_a, web_b = deployment
    alice, bob = users["alice"], users["bob"]
    page, watch = open_live_page(browser, web_a, bob, login_shot="login-page.png")
    expect_connected(page, "web-1")
    expect(page.locator("#rt-connection")).to_have_text(re.compile(r"^c-"))

    # A message for bob, published through the other instance, shows up and is acked.
    notice = publish_sync(web_b, alice, {"user": "bob", "event": "notice", "payload": {"text": "hello bob"}})
    item = shown(page, notice["id"])
    expect(item).to_be_visible(timeout=SHOW_MS)
    expect(item.locator(".message-event")).to_have_text("notice")
    expect(item.locator(".message-payload")).to_contain_text('"text": "hello bob"')
    expect(item.locator(".message-time")).to_have_attribute("datetime", re.compile(r"^\d{4}-\d\d-\d\dT"))
    deliveries = wait_for_ack(web_b, alice, notice["id"])
    assert deliveries[0]["instance"] == "web-1"
    assert deliveries[0]["connection"] == page.locator("#rt-connection").text_content()

    # Markup in a payload is text: nothing is created, nothing runs.
    hostile = publish_sync(
        web_b, alice, {"user": "bob", "event": "xss", "payload": {"html": XSS, "raw": XSS}}
    )
    payload = shown(page, hostile["id"]).locator(".message-payload")
    expect(payload).to_be_visible(timeout=SHOW_MS)
    assert XSS in payload.text_content()
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__xss") is None
    # Newest first.
    assert page.locator("#messages li").first.get_attribute("data-id") == hostile["id"]

    # A topic subscribed now is subscribed again on the next connection.
    page.get_by_role("textbox", name="Topic").fill("orders")
    page.get_by_role("button", name="Subscribe", exact=True).click()
    expect(page.locator('#topic-list li[data-topic="orders"]')).to_have_attribute("data-confirmed", "true")
    screenshot(page, "live-page.png")

    # The instance drains (1001) and goes; the page says so and keeps what is sent meanwhile.
    old_port = web_a.port
    web_a.stop()
    expect(page.locator("#rt-state")).to_have_attribute("data-state", re.compile("reconnecting|connecting"))
    expect(page.locator("#rt-instance")).to_have_text("—")
    page.get_by_label("Payload").fill('{"while": "away"}')
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#send-feedback")).to_contain_text("Queued")
    expect(page.locator("#rt-queued")).to_have_text("1")

    # Its successor on the same port takes the page back: resubscribed, queue flushed.
    web_a2 = cluster.add_web(name="web-1b", port=old_port)
    web_a2.wait_ready()
    expect_connected(page, "web-1b", timeout=RECONNECT_MS)
    expect(page.locator("#rt-queued")).to_have_text("0")
    echo = page.locator("#messages li", has=page.locator(".message-event", has_text="echo"))
    expect(echo.locator(".message-payload")).to_contain_text('"while": "away"', timeout=SHOW_MS)
    expect(page.locator('#topic-list li[data-topic="orders"]')).to_have_attribute(
        "data-confirmed", "true", timeout=SHOW_MS
    )
    again = publish_sync(web_b, alice, {"user": "bob", "event": "notice", "payload": {"text": "back again"}})
    expect(shown(page, again["id"])).to_be_visible(timeout=SHOW_MS)
    order = publish_sync(
        web_b, alice, {"topic": "orders", "event": "order.shipped", "payload": {"order": 42}}
    )
    expect(shown(page, order["id"]).locator(".message-topic")).to_have_text("orders", timeout=SHOW_MS)
    assert wait_for_ack(web_b, alice, again["id"])[0]["instance"] == "web-1b"
    screenshot(page, "live-page-after-restart.png")

    assert watch.errors == [] and watch.dialogs == []
    page.context.close()


@pytest.mark.browser
def test_chat_between_two_pages_on_two_instances(deployment, browser, users):
    from playwright.sync_api import expect

    web_a, web_b = deployment
    bob, bob_watch = open_live_page(browser, web_a, users["bob"])
    carol, carol_watch = open_live_page(browser, web_b, users["carol"])
    expect_connected(bob, "web-1")
    expect_connected(carol, "web-2")

    # carol joins the lobby; bob's first line subscribes him to it too.
    carol.get_by_role("textbox", name="Topic").fill("chat.lobby")
    carol.get_by_role("button", name="Subscribe", exact=True).click()
    expect(carol.locator('#topic-list li[data-topic="chat.lobby"]')).to_have_attribute(
        "data-confirmed", "true"
    )
    bob.get_by_label("Event", exact=True).select_option("chat.message")
    bob.get_by_label("Room").fill("lobby")
    bob.get_by_label("Text", exact=True).fill("hi <b>carol</b>")
    bob.get_by_role("button", name="Send").click()
    expect(bob.locator("#send-feedback")).to_contain_text(
        "Queued for the workers as inbound", timeout=SHOW_MS
    )

    for page in (carol, bob):
        line = page.locator("#messages li", has=page.locator(".message-topic", has_text="chat.lobby"))
        expect(line.locator(".message-event")).to_have_text("chat.message", timeout=SHOW_MS)
        expect(line.locator(".message-payload")).to_contain_text('"text": "hi <b>carol</b>"')
        expect(line.locator(".message-payload")).to_contain_text('"author": "bob"')
        assert page.locator("#messages b").count() == 0

    # An echo comes back to its sender only.
    bob.get_by_label("Event", exact=True).select_option("echo")
    bob.get_by_label("Payload").fill("just text")
    bob.get_by_role("button", name="Send").click()
    echo = bob.locator("#messages li", has=bob.locator(".message-event", has_text="echo"))
    expect(echo.locator(".message-payload")).to_contain_text('"data": "just text"', timeout=SHOW_MS)

    # After unsubscribing, carol gets no more lobby lines; a broadcast afterwards proves she listens.
    carol.get_by_role("button", name="Unsubscribe from chat.lobby").click()
    expect(carol.locator('#topic-list li[data-topic="chat.lobby"]')).to_have_count(0)
    expect(carol.locator("#activity")).to_contain_text("unsubscribed from chat.lobby", timeout=SHOW_MS)
    later = publish_sync(
        web_a, users["alice"], {"topic": "chat.lobby", "event": "chat.message", "payload": {}}
    )
    marker = publish_sync(web_a, users["alice"], {"broadcast": True, "event": "marker"})
    expect(shown(carol, marker["id"])).to_be_visible(timeout=SHOW_MS)
    expect(shown(bob, later["id"])).to_be_visible(timeout=SHOW_MS)
    assert shown(carol, later["id"]).count() == 0
    screenshot(carol, "live-page-chat.png")

    for watch in (bob_watch, carol_watch):
        assert watch.errors == [] and watch.dialogs == []


# Milliseconds a presence change may take to show on the other page: CONTRACT §4 "Presence" says
# 2 s for a socket that closes; the rest is slack for two shared cores.
PRESENCE_MS = 6_000

# Records, in the page, the id of every message frame the server sends (before the client's own
# check for copies), so a test can tell what the server sent from what the page shows.
COUNT_FRAMES_JS = """() => {
  window.__messageFrames = [];
  window.realtime.on("frame", (frame) => {
    if (frame.type === "message") window.__messageFrames.push(frame.id);
  });
}"""


def shown_ids(page) -> list[str]:
    """The ids of the page's message list, top (newest) first."""
    return page.locator("#messages li[data-id]").evaluate_all("items => items.map(i => i.dataset.id)")


def presence_of(page, topic: str):
    return page.locator(f'#presence-list li[data-topic="{topic}"]')


def wait_all_shown(page, streams: dict[str, list[str]], timeout: int = SHOW_MS) -> None:
    """Until the page shows every id of `streams` (name -> ids); on timeout, say what is missing."""
    from playwright.sync_api import Error as PlaywrightError

    wanted = [mid for ids in streams.values() for mid in ids]
    try:
        page.wait_for_function(
            'ids => ids.every(id => document.querySelector(`#messages li[data-id="${id}"]`))',
            arg=wanted,
            timeout=timeout,
        )
    except PlaywrightError:
        have = set(shown_ids(page))
        missing = {name: sum(mid not in have for mid in ids) for name, ids in streams.items()}
        activity = page.locator("#activity").inner_text()
        raise AssertionError(f"not shown, per stream: {missing}; activity:\n{activity}") from None


@pytest.mark.browser
def test_page_recovers_what_was_published_while_its_instance_was_killed(cluster, deployment, browser, users):
    """Issue 12: SIGKILL of the page's instance; what is published meanwhile shows once, in order."""
    from playwright.sync_api import expect

    web_a, web_b = deployment
    alice = users["alice"]
    page, watch = open_live_page(browser, web_a, users["bob"])
    expect_connected(page, "web-1")
    page.evaluate(COUNT_FRAMES_JS)
    page.get_by_role("textbox", name="Topic").fill("orders")
    page.get_by_role("button", name="Subscribe", exact=True).click()
    expect(page.locator('#topic-list li[data-topic="orders"]')).to_have_attribute("data-confirmed", "true")

    # One topic message seen live; nothing yet on bob's own stream or the broadcasts, so the page
    # knows no position of those two streams when its instance dies.
    before = publish_sync(web_b, alice, {"topic": "orders", "event": "order.placed", "payload": {"n": 0}})
    expect(shown(page, before["id"])).to_be_visible(timeout=SHOW_MS)

    # The instance dies without a word (no drain, no close frame).
    old_port = web_a.port
    web_a.kill()
    expect(page.locator("#rt-state")).to_have_attribute(
        "data-state", re.compile("reconnecting|connecting"), timeout=SHOW_MS
    )
    expect(page.locator("#rt-instance")).to_have_text("—")

    # Meanwhile alice publishes through the other instance: to the topic, to bob, to everyone.
    missed: dict[str, list[str]] = {"topic:orders": [], "user": [], "broadcast": []}
    for n in range(1, 6):
        for stream, body in (
            ("topic:orders", {"topic": "orders", "event": "order.shipped", "payload": {"n": n}}),
            ("user", {"user": "bob", "event": "notice", "payload": {"n": n}}),
        ):
            missed[stream].append(publish_sync(web_b, alice, body)["id"])
    for n in range(1, 3):
        missed["broadcast"].append(
            publish_sync(web_b, alice, {"broadcast": True, "event": "news", "payload": {"n": n}})["id"]
        )
    expected = [before["id"], *(mid for ids in missed.values() for mid in ids)]

    # A successor on the same port takes the page back and replays what each stream missed.
    web_a2 = cluster.add_web(name="web-1b", port=old_port)
    web_a2.wait_ready()
    expect_connected(page, "web-1b", timeout=RECONNECT_MS)
    wait_all_shown(page, missed | {"before": [before["id"]]})
    # A message published after the reconnect marks the seam: it comes after the replay, so any
    # late copy of a replayed message would have arrived before it.
    after = publish_sync(web_b, alice, {"user": "bob", "event": "notice", "payload": {"n": "after"}})
    expect(shown(page, after["id"])).to_be_visible(timeout=SHOW_MS)
    expected.append(after["id"])
    missed["user"].append(after["id"])

    ids = shown_ids(page)
    assert sorted(ids) == sorted(expected), "the page shows each message exactly once"
    assert len(set(ids)) == len(ids)
    frames = page.evaluate("window.__messageFrames")
    assert sorted(frames) == sorted(expected), "the server sent each message exactly once"
    # Newest first on the page: each stream's messages read back in publication order.
    oldest_first = ids[::-1]
    for stream, stream_ids in missed.items():
        assert [i for i in oldest_first if i in stream_ids] == stream_ids, stream
    expect(page.locator("#message-count")).to_have_text(str(len(expected)))
    expect(page.locator("#messages-missed")).to_be_hidden()
    for stream in ("topic:orders", "user", "broadcast"):
        expect(page.locator("#activity")).not_to_contain_text(f"missed messages of {stream}")
    expect(page.locator("#activity")).to_contain_text("recovered what topic:orders missed")
    screenshot(page, "live-page-recovered-after-kill.png")

    assert watch.errors == [] and watch.dialogs == []
    page.context.close()


@pytest.mark.browser
def test_who_is_here_follows_two_pages_on_two_instances(deployment, browser, users):
    """Issue 13: each page lists both users on the topic; a page that closes drops off the other's."""
    from playwright.sync_api import expect

    web_a, web_b = deployment
    bob, bob_watch = open_live_page(browser, web_a, users["bob"])
    carol, carol_watch = open_live_page(browser, web_b, users["carol"])
    expect_connected(bob, "web-1")
    expect_connected(carol, "web-2")
    expect(bob.locator("#presence-empty")).to_be_visible()

    for page in (bob, carol):
        page.get_by_role("textbox", name="Topic").fill("room.42")
        page.get_by_role("button", name="Subscribe", exact=True).click()
        expect(page.locator('#topic-list li[data-topic="room.42"]')).to_have_attribute(
            "data-confirmed", "true"
        )
    # bob learns of carol from her join (another instance); carol from her snapshot.
    for page in (bob, carol):
        row = presence_of(page, "room.42")
        expect(row.locator("strong")).to_have_text("room.42", timeout=PRESENCE_MS)
        expect(row.locator("span")).to_have_text("bob, carol", timeout=PRESENCE_MS)
        expect(page.locator("#presence-list li")).to_have_count(1)
        expect(page.locator("#presence-empty")).to_be_hidden()
    expect(bob.locator("#activity")).to_contain_text("carol joined room.42")
    screenshot(bob, "live-page-presence.png")

    # carol closes her page: bob's list drops her within the deadline, by a leave.
    carol.context.close()
    expect(presence_of(bob, "room.42").locator("span")).to_have_text("bob", timeout=PRESENCE_MS)
    expect(bob.locator("#activity")).to_contain_text("carol left room.42")
    screenshot(bob, "live-page-presence-after-leave.png")

    # Unsubscribing empties bob's own list.
    bob.get_by_role("button", name="Unsubscribe from room.42").click()
    expect(bob.locator("#presence-list li")).to_have_count(0, timeout=SHOW_MS)
    expect(bob.locator("#presence-empty")).to_be_visible()

    for watch in (bob_watch, carol_watch):
        assert watch.errors == [] and watch.dialogs == []
    bob.context.close()


# --- the client library alone, against a scripted socket -------------------------------------

REALTIME_JS = ROOT / "notifications" / "static" / "notifications" / "realtime.js"

# A stand-in for WebSocket that the test drives: it records what the client sends and lets the
# test open, feed and drop each connection, so close codes the server cannot yet send are covered.
# Backoff delays are long and read from the `state` events; the test moves on by firing the
# browser's `online` event (which makes the client retry at once), inside the same evaluate()
# as the drop, so no timer can fire in between and nothing depends on timing.
FAKE_SOCKET_JS = """
class FakeSocket {
  constructor(url) { this.url = url; this.sent = []; FakeSocket.all.push(this); }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code) { this.closedWith = code || 1000; }
  open() { this.onopen({}); }
  receive(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
  drop(code) { this.onclose({ code: code, reason: "" }); }
}
FakeSocket.all = [];
window.FakeSocket = FakeSocket;
window.events = [];
window.last = () => FakeSocket.all[FakeSocket.all.length - 1];
window.welcome = (n) => last().receive({type: "welcome", connection: "c-" + n, instance: "web", user: "u"});
/** Drop the current socket with `code`; report the planned delay, then retry at once. */
window.dropAndRetry = (code, opened) => {
  const before = FakeSocket.all.length;
  last().drop(code);
  const planned = { state: client.state, delay: events.filter((e) => e.type === "state").pop().detail.delay };
  window.dispatchEvent(new Event("online"));
  if (opened) last().open();
  return Object.assign(planned, { created: FakeSocket.all.length - before });
};
window.client = new RealtimeClient({
  url: "ws://example.test/ws/", WebSocket: FakeSocket, topics: ["news"], pingInterval: 0,
  minDelay: 1000, maxDelay: 8000, drainDelay: 50, slowReaderDelay: 3000, flushBatch: 2, flushPause: 50,
});
for (const type of ["state", "welcome", "message", "queue", "subscriptionerror", "servererror", "recovered", "reset"]) {
  client.on(type, (detail) => events.push({ type, detail }));
}
// evaluate() calls what a script ends on if it is a function: here it would be the remover that
// on() returns, silently dropping the last listener. End on a value instead.
null;
"""


@pytest.mark.browser
def test_realtime_client_reconnects_resubscribes_and_flushes(bare_browser):
    page = bare_browser.new_page()
    watch = PageWatch(page)
    page.set_content("<!doctype html><title>client</title>")
    page.add_script_tag(content=REALTIME_JS.read_text())
    page.evaluate(FAKE_SOCKET_JS)
    run = page.evaluate

    # First connection: its own streams are resumed and its topics subscribed as soon as it opens.
    assert run("client.state") == "connecting" and run("last().url") == "ws://example.test/ws/"
    run("last().open(); welcome(1)")
    assert run("client.state") == "open"
    assert run("last().sent.map(f => [f.type, f.stream || f.topic])") == [
        ["resume", "user"],
        ["resume", "broadcast"],
        ["subscribe", "news"],
    ]
    assert run("client.ack('00000000-0000-0000-0000-000000000001')") is True
    assert run("last().sent[3]") == {"type": "ack", "id": "00000000-0000-0000-0000-000000000001"}

    # Dropped (1006): a jittered wait in [min/2, min]; meanwhile frames queue and acks do not.
    lost = run("""(() => {
        last().drop(1006);
        const planned = events.filter((e) => e.type === "state").pop().detail;
        client.subscribe("orders");
        for (const n of [1, 2, 3]) client.sendEvent("echo", {n});
        const acked = client.ack("00000000-0000-0000-0000-000000000002");
        return {state: client.state, delay: planned.delay, queued: client.queued, acked};
    })()""")
    assert lost["state"] == "reconnecting" and 500 <= lost["delay"] <= 1000, lost
    assert (lost["queued"], lost["acked"]) == (3, False)

    # Second connection: resumed and resubscribed first, then the queue flushed in paced batches of two.
    run("window.dispatchEvent(new Event('online')); last().open()")
    page.wait_for_function("client.queued === 0", timeout=5_000)
    sent = run("last().sent")
    assert [(f["type"], f.get("stream") or f.get("topic")) for f in sent[:4]] == [
        ("resume", "user"),
        ("resume", "broadcast"),
        ("subscribe", "news"),
        ("subscribe", "orders"),
    ]
    assert [f["payload"] for f in sent[4:]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert len({f["ref"] for f in sent[4:]}) == 3

    # Failed attempts back off exponentially up to the cap (the connection above opened but got no
    # welcome, so it counts as failed too): ceilings 2, 4, 8, 8 s.
    retries = [run("dropAndRetry(1006, false)") for _ in range(4)]
    assert all(r["state"] == "reconnecting" and r["created"] == 1 for r in retries), retries
    for retry, ceiling in zip(retries, [2000, 4000, 8000, 8000], strict=True):
        assert ceiling / 2 <= retry["delay"] <= ceiling, retries

    # A welcome resets the backoff; a drain (1001, or 4001) comes back at once, a slow reader waits.
    run("last().open(); welcome(2)")
    for code, low, high in [(1001, 0, 50), (4001, 0, 50), (1013, 3000, 8000), (4013, 3000, 8000)]:
        retry = run(f"dropAndRetry({code}, true)")
        assert low <= retry["delay"] <= high and retry["created"] == 1, (code, retry)
        run("welcome(3)")

    # A refused subscribe is forgotten, so it is not asked again on every reconnect.
    ref = run("last().sent.find(f => f.topic === 'orders').ref")
    run(f"last().receive({{type: 'error', code: 'forbidden', detail: 'no', ref: '{ref}'}})")
    assert run("Array.from(client.topics)") == ["news"]
    assert run("events.filter(e => e.type === 'subscriptionerror').map(e => e.detail.topic)") == ["orders"]

    # Messages become events; close() is final.
    run("last().receive({type: 'message', id: 'm1', topic: null, event: 'x', payload: 1})")
    assert run("events.filter(e => e.type === 'message').map(e => e.detail.id)") == ["m1"]
    sockets = run("FakeSocket.all.length")
    run("client.close(); window.dispatchEvent(new Event('online'))")
    assert run("client.state") == "closed" and run("last().closedWith") == 1000
    assert run("FakeSocket.all.length") == sockets
    assert watch.errors == []


@pytest.mark.browser
def test_realtime_client_resumes_its_streams_from_what_it_saw(bare_browser):
    """The positions sent after a reconnect, from the first connection on (issue 12)."""
    page = bare_browser.new_page()
    watch = PageWatch(page)
    page.set_content("<!doctype html><title>client</title>")
    page.add_script_tag(content=REALTIME_JS.read_text())
    page.evaluate(FAKE_SOCKET_JS)
    run = page.evaluate
    kinds = "(type) => events.filter((e) => e.type === type).map((e) => e.detail)"
    run(f"window.of = {kinds}")

    # Nothing seen yet: `user` and `broadcast` are resumed from an epoch no stream has, so their
    # answers give where they stand (nothing missed, no reset); `news` gets a plain subscribe.
    run("last().open(); welcome(1)")
    first = run("last().sent")
    assert [f["since"] for f in first[:2]] == [{"seq": 0, "epoch": ""}] * 2
    assert "since" not in first[2] and first[2]["topic"] == "news"
    run("""(() => {
        last().receive({type: "resumed", stream: "user", seq: 4, epoch: "u1", recovered: false});
        last().receive({type: "resumed", stream: "broadcast", seq: 0, epoch: "b1", recovered: false});
        last().receive({type: "subscribed", topic: "news", seq: 7, epoch: "t1"});
        last().receive({type: "message", id: "m8", stream: "topic:news", seq: 8, epoch: "t1", topic: "news"});
        last().receive({type: "message", id: "m8", stream: "topic:news", seq: 8, epoch: "t1", topic: "news"});
    })()""")
    assert run("of('reset')") == [] and run("of('recovered')") == []
    assert run("of('message').map((m) => m.id)") == ["m8"], "a copy is dropped"

    # Reconnected: every stream resumes from the last position it saw.
    run("dropAndRetry(1006, true); welcome(2)")
    second = run("last().sent")
    assert [(f["type"], f.get("stream") or f.get("topic"), f["since"]) for f in second[:3]] == [
        ("resume", "user", {"seq": 4, "epoch": "u1"}),
        ("resume", "broadcast", {"seq": 0, "epoch": "b1"}),
        ("subscribe", "news", {"seq": 8, "epoch": "t1"}),
    ]

    # Recovered streams say so; one that could not be recovered resets, and goes on from its answer.
    run("""(() => {
        last().receive({type: "resumed", stream: "user", seq: 6, epoch: "u1", recovered: true});
        last().receive({type: "message", id: "m5", stream: "user", seq: 5, epoch: "u1"});
        last().receive({type: "message", id: "m6", stream: "user", seq: 6, epoch: "u1"});
        last().receive({type: "resumed", stream: "broadcast", seq: 3000, epoch: "b1", recovered: false});
        last().receive({type: "subscribed", topic: "news", seq: 8, epoch: "t1", recovered: true});
    })()""")
    assert run("of('recovered').map((r) => r.stream)") == ["user", "topic:news"]
    assert run("of('reset')") == [{"stream": "broadcast", "seq": 3000, "epoch": "b1"}]
    assert run("of('message').map((m) => m.id)") == ["m8", "m5", "m6"]
    run("dropAndRetry(1006, true); welcome(3)")
    assert [f["since"] for f in run("last().sent")[:3]] == [
        {"seq": 6, "epoch": "u1"},
        {"seq": 3000, "epoch": "b1"},
        {"seq": 8, "epoch": "t1"},
    ]
    assert watch.errors == []


@pytest.mark.browser
def test_realtime_client_keeps_members_from_a_snapshot_and_the_changes_around_it(bare_browser):
    """Joins and leaves heard before the snapshot's answer are applied on top of it (issue 13)."""
    page = bare_browser.new_page()
    watch = PageWatch(page)
    page.set_content("<!doctype html><title>client</title>")
    page.add_script_tag(content=REALTIME_JS.read_text())
    page.evaluate(FAKE_SOCKET_JS)
    run = page.evaluate
    run("""() => {
        window.lists = [];
        client.on("members", (info) => lists.push([info.topic, info.users]));
        last().open();
        welcome(1);
        client.subscribe("room", {presence: true});
    }""")
    subscribe = run("last().sent.find((f) => f.topic === 'room')")
    assert subscribe["presence"] is True
    run("last().receive({type: 'subscribed', topic: 'room', seq: 0, epoch: 'r1'})")
    ask = run("last().sent.find((f) => f.type === 'presence')")
    assert ask["topic"] == "room" and ask["ref"].startswith("p")

    # carol joins and dave leaves before the snapshot comes; the snapshot was read before both.
    run(f"""async () => {{
        last().receive({{type: "join", topic: "room", user: "carol"}});
        last().receive({{type: "leave", topic: "room", user: "dave"}});
        last().receive({{type: "presence", ref: "{ask["ref"]}", topic: "room",
                         users: [{{user: "bob", connections: 1}}, {{user: "dave", connections: 1}}]}});
        await Promise.resolve();
    }}""")
    assert run("lists") == [["room", ["bob", "carol"]]]
    run("last().receive({type: 'leave', topic: 'room', user: 'carol'})")
    assert run("lists.at(-1)") == ["room", ["bob"]]

    # A new connection asks again and replaces the list; unsubscribing forgets it.
    run("dropAndRetry(1006, true); welcome(2)")
    assert run("last().sent.find((f) => f.topic === 'room').presence") is True
    run("last().receive({type: 'subscribed', topic: 'room', seq: 0, epoch: 'r1'})")
    again = run("last().sent.find((f) => f.type === 'presence').ref")
    run(f"""async () => {{
        last().receive({{type: "presence", ref: "{again}", topic: "room", users: [{{user: "erin", connections: 2}}]}});
        await Promise.resolve();
    }}""")
    assert run("lists.at(-1)") == ["room", ["erin"]]
    run("client.unsubscribe('room'); last().receive({type: 'join', topic: 'room', user: 'zed'})")
    assert run("client.members.has('room')") is False and run("lists.at(-1)") == ["room", ["erin"]]
    assert watch.errors == []


@pytest.mark.browser
def test_admin_overview_follows_instances_queues_and_dead_frames(cluster, deployment, browser, users):
    """Issue 16: /admin/overview/ in Chromium with two instances and a worker up, then one of the
    instances killed: it shows gone within its lease time; the queue depths are the broker's; a
    dead frame is requeued from the page; non-staff get the admin's sign-in page, and the page
    stays usable on an instance that cannot reach the broker."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    import aio_pika
    from django.conf import settings
    from django.contrib.auth.models import Permission, User
    from django.db import connections
    from django.utils import timezone
    from playwright.sync_api import expect

    from consumers_app.leases import TTL_SECONDS
    from notifications.admin_overview import REFRESH_MS
    from notifications.broker import Topology
    from notifications.models import InboundFrame, InstanceLease
    from tests.support.broker import queue_stats
    from tests.support.processes import free_port

    def off_loop(function):
        """Run `function` in a thread of its own: this one holds Playwright's event loop, where
        neither the ORM nor asyncio.run may be used."""

        def call():
            try:
                return function()
            finally:
                connections.close_all()

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(call).result(timeout=30)

    def in_thread(make_coroutine):
        return off_loop(lambda: asyncio.run(make_coroutine()))

    def answers(url: str) -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    web_a, web_b = deployment
    topology = Topology(cluster.namespace)
    dead_in_queue = 5

    async def fill_dead_queue() -> None:
        connection = await aio_pika.connect(settings.AMQP_URL)
        try:
            channel = await connection.channel(publisher_confirms=True)
            for n in range(dead_in_queue):
                await channel.default_exchange.publish(
                    aio_pika.Message(b'{"n": %d}' % n), routing_key=topology.dead_queue
                )
        finally:
            await connection.close()

    def dead_frame_and_requeue_permission() -> InboundFrame:
        staff = User.objects.get(username="staff")
        staff.user_permissions.add(Permission.objects.get(codename="change_inboundframe"))
        return InboundFrame.objects.create(
            user=User.objects.get(username="bob"),
            event="echo",
            payload={"text": "once more"},
            status=InboundFrame.Status.DEAD,
            attempts=5,
            error="RuntimeError: the handler gave up <b>loudly</b>",
            processed_at=timezone.now(),
        )

    in_thread(fill_dead_queue)
    frame = off_loop(dead_frame_and_requeue_permission)

    # bob's live page holds a socket on web-1, and gets (and acks) three messages.
    live, _ = open_live_page(browser, web_a, users["bob"])
    expect_connected(live, "web-1")
    for n in range(3):
        sent = publish_sync(web_b, users["alice"], {"user": "bob", "event": "note", "payload": {"n": n}})
        expect(shown(live, sent["id"])).to_be_visible(timeout=SHOW_MS)

    # The staff user signs in to the admin and follows the index's link.
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    watch = PageWatch(page)
    page.goto(f"{web_a.url}/admin/")
    page.get_by_label("Username").fill(users["staff"].username)
    page.get_by_label("Password").fill(users["staff"].password)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{web_a.url}/admin/")
    page.locator("#overview-link").click()
    expect(page).to_have_url(f"{web_a.url}/admin/overview/")

    def row(instance: str):
        return page.locator(f'tr[data-instance="{instance}"]')

    for instance in ("web-1", "web-2", "worker-1"):
        expect(row(instance)).to_have_attribute("data-state", "up", timeout=SHOW_MS)
    # Counters come with the leases (renewed every 3 s) and the page refreshes by itself.
    expect(row("web-1").locator('[data-stat="sockets"]')).to_have_text("1", timeout=SHOW_MS)
    expect(row("worker-1").locator('[data-stat="lanes"]')).to_have_text("4")

    # Queue depths: what a passive declare says now.
    dead_row = page.locator(f'#queues tr[data-queue="{topology.dead_queue}"] td[data-messages]')
    expect(dead_row).to_have_attribute("data-messages", str(dead_in_queue), timeout=SHOW_MS)
    depths = dict(
        page.locator("#queues tr[data-queue]").evaluate_all(
            "rows => rows.map(r => [r.dataset.queue, r.querySelector('td[data-messages]').dataset.messages])"
        )
    )
    assert list(depths) == [
        topology.inbound_queue,
        *map(topology.retry_queue, [1, 2, 4, 8]),
        topology.dead_queue,
    ]
    for name, messages in depths.items():
        stats = in_thread(lambda name=name: queue_stats(name))
        assert stats is not None and messages == str(stats[0]), (name, messages, stats)
    # The last hour's rates (read again every 10 s): at least the three messages, delivered and acked.
    for series in ("published", "delivered", "acked"):
        chart = page.locator(f'#overview-rates figure[data-series="{series}"]')
        expect(chart).to_have_attribute("data-total", re.compile(r"^([3-9]|\d\d+)$"), timeout=25_000)
        expect(chart.locator("rect")).not_to_have_count(0)
    dead = page.locator(f'#dead-frames tr[data-frame="{frame.pk}"]')
    expect(dead).to_contain_text("RuntimeError: the handler gave up <b>loudly</b>")
    screenshot(page, "admin-overview.png")

    # web-2 dies without a word: gone once its lease lapses (at most TTL after its last renewal).
    killed_at = time.monotonic()
    web_b.kill()
    expect(row("web-2")).to_have_attribute(
        "data-state", "gone", timeout=int((TTL_SECONDS + 2 * REFRESH_MS / 1000 + 3) * 1000)
    )
    gone_after = time.monotonic() - killed_at
    assert gone_after <= TTL_SECONDS + 2 * REFRESH_MS / 1000 + 3, gone_after
    expect(row("web-1")).to_have_attribute("data-state", "up")
    expect(row("worker-1")).to_have_attribute("data-state", "up")
    # web-1 removes the lapsed lease; the page keeps showing web-2 as gone.
    wait_until(
        lambda: off_loop(lambda: not InstanceLease.objects.filter(instance="web-2").exists()),
        timeout=SHOW_MS / 1000,
        what="web-2's lease removed",
    )
    before = page.locator("#overview-status").get_attribute("data-generated-at")
    expect(page.locator("#overview-status")).not_to_have_attribute(
        "data-generated-at", before, timeout=SHOW_MS
    )
    expect(row("web-2")).to_have_attribute("data-state", "gone")
    expect(page.locator("#overview-status")).to_have_attribute("data-state", "live")
    screenshot(page, "admin-overview-instance-gone.png")

    # Requeue the dead frame from the page: the worker processes it this time.
    page.get_by_role("button", name=f"Requeue frame {frame.pk}").click()
    expect(page.locator(".messagelist")).to_contain_text("Requeued 1 dead frame(s).")
    wait_until(
        lambda: off_loop(
            lambda: InboundFrame.objects.get(pk=frame.pk).status == InboundFrame.Status.PROCESSED
        ),
        timeout=SHOW_MS / 1000,
        what="the requeued frame processed",
    )
    expect(page.locator("#no-dead-frames")).to_be_visible(timeout=SHOW_MS)

    # An instance that cannot reach the broker still serves the page, saying so.
    cut_off = cluster.add_web("web-3", AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    wait_until(lambda: answers(f"{cut_off.url}/healthz"), timeout=SHOW_MS / 1000, what="web-3 serving HTTP")
    started = time.monotonic()
    page.goto(f"{cut_off.url}/admin/overview/")  # the session cookie is the host's, any port
    assert time.monotonic() - started < 10
    expect(page.locator("#broker-unavailable")).to_contain_text("Broker unavailable")
    expect(row("web-1")).to_have_attribute("data-state", "up")
    expect(page.locator("#overview-status")).to_have_attribute("data-state", "live", timeout=SHOW_MS)
    screenshot(page, "admin-overview-broker-unavailable.png")
    assert watch.errors == [] and watch.dialogs == []

    # bob is signed in but no staff: the admin's sign-in page, and 403 for the page's data.
    bob_page = live.context.new_page()
    bob_page.goto(f"{web_a.url}/admin/overview/")
    expect(bob_page).to_have_url(f"{web_a.url}/admin/login/?next=/admin/overview/")
    expect(bob_page.locator("body")).to_contain_text("not authorized")
    assert live.context.request.get(f"{web_a.url}/admin/overview/parts/").status == 403
    context.close()
