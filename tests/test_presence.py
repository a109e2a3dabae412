"""Presence across real web instances (CONTRACT §4 "Presence", §3 `GET /api/v1/presence/`).

Per topic and cluster-wide: `presence` on any instance and the API list every subscribed user
with their socket count; sockets that subscribed with `"presence": true` get a user's `join`
when their first socket subscribes and `leave` when the last one goes, within 2 s, once per
change; a SIGKILLed instance's users leave within 20 s.
"""

import asyncio

import httpx
from channels.db import database_sync_to_async
from django.contrib.auth.models import Group

from notifications.models import Topic
from tests.support.clients import LiveSocket, open_socket
from tests.support.processes import Proc
from tests.support.waiting import eventually

# The contract's bounds, and a margin for two shared cores.
LEAVE_WITHIN = 2.0
DEAD_INSTANCE_LEAVE_WITHIN = 20.0
SLACK = 3.0


def events(socket: LiveSocket, topic: str) -> list[tuple[str, str]]:
    return [
        (f["type"], f["user"])
        for f in socket.others
        if f["type"] in ("join", "leave") and f["topic"] == topic
    ]


async def subscribe(socket: LiveSocket, topic: str, presence: bool = True) -> dict:
    answer = await socket.request({"type": "subscribe", "topic": topic, "presence": presence}, "subscribed")
    assert answer["type"] == "subscribed", answer
    return answer


async def presence_on(socket: LiveSocket, topic: str, ref: str = "p1") -> dict[str, int]:
    answer = await socket.request({"type": "presence", "ref": ref, "topic": topic}, "presence")
    assert answer["type"] == "presence" and answer["ref"] == ref, answer
    return {member["user"]: member["connections"] for member in answer["users"]}


async def presence_api(http: httpx.AsyncClient, web: Proc, user, topic: str) -> httpx.Response:
    return await http.get(f"{web.url}/api/v1/presence/", params={"topic": topic}, headers=user.headers)


async def webs(cluster, count: int) -> list[Proc]:
    started = [cluster.add_web() for _ in range(count)]
    for web in started:
        await asyncio.to_thread(web.wait_ready)
    return started


async def test_three_users_on_three_instances_and_a_user_with_two_tabs(cluster, users):
    web_a, web_b, web_c = await webs(cluster, 3)
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web_a, users["bob"])
        carol = await open_socket(http, web_b, users["carol"])
        alice = await open_socket(http, web_c, users["alice"])
        for socket in (bob, carol, alice):
            await subscribe(socket, "room")
        everyone = {"alice": 1, "bob": 1, "carol": 1}
        for socket in (bob, carol, alice):
            assert await presence_on(socket, "room") == everyone
        for web in (web_a, web_b, web_c):
            response = await presence_api(http, web, users["alice"], "room")
            assert response.status_code == 200, response.text
            assert response.json() == {
                "topic": "room",
                "users": [{"user": u, "connections": n} for u, n in sorted(everyone.items())],
            }

        # carol closes: the others hear her leave within 2 s.
        await carol.close()
        loop = asyncio.get_running_loop()
        closed_at = loop.time()
        for socket in (bob, alice):
            await socket.wait_for(
                lambda s: ("leave", "carol") in events(s, "room"), LEAVE_WITHIN + SLACK, "leave"
            )
        assert loop.time() - closed_at < LEAVE_WITHIN + SLACK
        assert await presence_on(bob, "room") == {"alice": 1, "bob": 1}

        # staff with two tabs on two instances: one join, and one leave only after both close.
        tab_1 = await open_socket(http, web_a, users["staff"])
        tab_2 = await open_socket(http, web_b, users["staff"])
        await subscribe(tab_1, "room")
        await bob.wait_for(lambda s: ("join", "staff") in events(s, "room"), LEAVE_WITHIN + SLACK, "join")
        await subscribe(tab_2, "room")
        assert await presence_on(alice, "room") == {"alice": 1, "bob": 1, "staff": 2}
        await tab_1.close()

        async def one_tab_left() -> bool:
            return await presence_on(alice, "room", ref=f"p{id(object())}") == {
                "alice": 1,
                "bob": 1,
                "staff": 1,
            }

        await eventually(one_tab_left, LEAVE_WITHIN + SLACK, "the first tab to stop counting")
        assert ("leave", "staff") not in events(bob, "room"), "a user with a tab left has not left"
        await tab_2.close()
        await bob.wait_for(lambda s: ("leave", "staff") in events(s, "room"), LEAVE_WITHIN + SLACK, "leave")
        await alice.wait_for(lambda s: ("leave", "staff") in events(s, "room"), LEAVE_WITHIN + SLACK, "leave")
        for socket in (bob, alice):
            staff_events = [e for e in events(socket, "room") if e[1] == "staff"]
            assert staff_events == [("join", "staff"), ("leave", "staff")], staff_events
        await bob.close()
        await alice.close()


async def test_sockets_without_presence_get_no_events_but_count(cluster, users):
    (web,) = await webs(cluster, 1)
    async with httpx.AsyncClient(timeout=30) as http:
        quiet = await open_socket(http, web, users["bob"])
        watcher = await open_socket(http, web, users["carol"])
        await subscribe(quiet, "lobby", presence=False)
        await subscribe(watcher, "lobby")
        other = await open_socket(http, web, users["alice"])
        await subscribe(other, "lobby", presence=False)
        await watcher.wait_for(
            lambda s: ("join", "alice") in events(s, "lobby"), LEAVE_WITHIN + SLACK, "join"
        )
        assert await presence_on(quiet, "lobby") == {"alice": 1, "bob": 1, "carol": 1}
        assert events(quiet, "lobby") == []
        for socket in (quiet, watcher, other):
            await socket.close()


async def test_a_killed_instances_users_leave_within_20_seconds(cluster, users):
    web_a, web_b = await webs(cluster, 2)
    async with httpx.AsyncClient(timeout=30) as http:
        watcher = await open_socket(http, web_b, users["alice"])
        await subscribe(watcher, "ops")
        bob = await open_socket(http, web_a, users["bob"])
        carol = await open_socket(http, web_a, users["carol"])
        for socket in (bob, carol):
            await subscribe(socket, "ops")
        await watcher.wait_for(
            lambda s: {("join", "bob"), ("join", "carol")} <= set(events(s, "ops")),
            LEAVE_WITHIN + SLACK,
            "joins",
        )
        loop = asyncio.get_running_loop()
        web_a.kill()
        killed_at = loop.time()
        await watcher.wait_for(
            lambda s: {("leave", "bob"), ("leave", "carol")} <= set(events(s, "ops")),
            DEAD_INSTANCE_LEAVE_WITHIN + SLACK,
            "leaves of the killed instance's users",
        )
        assert loop.time() - killed_at < DEAD_INSTANCE_LEAVE_WITHIN + SLACK
        response = await presence_api(http, web_b, users["alice"], "ops")
        assert response.json()["users"] == [{"user": "alice", "connections": 1}]
        await watcher.close()


async def test_a_restricted_topics_presence_needs_the_right_to_subscribe(cluster, users):
    (web,) = await webs(cluster, 1)

    def restrict() -> None:
        topic = Topic.objects.create(name="board")
        topic.groups.add(Group.objects.create(name="directors"))

    await database_sync_to_async(restrict)()
    async with httpx.AsyncClient(timeout=30) as http:
        bob = await open_socket(http, web, users["bob"])
        refused = await bob.request({"type": "presence", "ref": "p9", "topic": "board"}, "presence")
        assert (refused["type"], refused["code"], refused["ref"]) == ("error", "forbidden", "p9")
        assert (await presence_api(http, web, users["bob"], "board")).status_code == 403
        # Publishers and staff may read it.
        assert (await presence_api(http, web, users["alice"], "board")).status_code == 200
        assert (await presence_api(http, web, users["staff"], "board")).status_code == 200
        bad = await presence_api(http, web, users["bob"], "no spaces allowed")
        assert bad.status_code == 400
        await bob.close()
