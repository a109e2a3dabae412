"""The deployments the benchmarks run: web instances (and workers) of the project or the baseline."""

from typing import Any

import httpx

from bench import common
from bench.common import Proc, log
from bench.sockets import SocketSpec, Tickets, open_socket
from tests.support.broker import wait_consumers
from tests.support.processes import stop_all, worker_argv

# --- servers --------------------------------------------------------------------------------


class Deployment:
    """The web instances of one run (project or baseline), cleaned up in `close()`."""

    def __init__(self, target: str, db_url: str | None, instances: int, extra_env: dict[str, str]) -> None:
        self.target = target
        self.run_id = common.new_run_id("bench")
        self.webs: list[Proc] = []
        self.workers: list[Proc] = []
        self.instance_ids = [f"web-{i + 1}" for i in range(instances)]
        if target == "project":
            self.env = common.project_env(db_url, self.run_id, self.run_id, **extra_env)
        else:
            self.env = common.baseline_env(self.run_id, self.run_id, **extra_env)
        self.count = instances

    def start(self) -> "Deployment":
        app = common.PROJECT_APP if self.target == "project" else common.BASELINE_APP
        for name in self.instance_ids:
            env = self.env | {"RT_INSTANCE_ID": name, "BASELINE_INSTANCE_ID": name}
            self.webs.append(common.daphne(name, env, app))
        for web in self.webs:
            web.wait_ready(common.START_TIMEOUT)
        return self

    def add_workers(self, count: int, concurrency: int) -> None:
        for i in range(count):
            name = f"worker-{i + 1}"
            env = self.env | {"RT_INSTANCE_ID": name, "BASELINE_INSTANCE_ID": name}
            if self.target == "project":
                argv = worker_argv(concurrency)
            else:
                argv = [common.PYTHON, "-m", "django", "runworker", "bench-echo"]
            self.workers.append(common.start_proc(name, argv, env))
        if self.target == "project":
            wait_consumers(
                f"{self.run_id}.inbound",
                count,
                self.workers,
                url=common.AMQP_URL,
                timeout=common.START_TIMEOUT,
            )
        else:
            for worker in self.workers:
                worker.wait_log("Running worker", common.START_TIMEOUT)

    def close(self, notes: list[str]) -> None:
        """Stop every process and delete what the run declared; add a note per log with problems."""
        stop_all(self.webs + self.workers, common.STOP_TIMEOUT)
        if self.target == "project":
            common.delete_namespace(self.env, self.instance_ids)
        else:
            try:
                common.delete_redis_prefix(self.run_id)
            except Exception as exc:
                log(f"could not delete redis keys {self.run_id}*: {exc}")
        for proc in self.webs + self.workers:
            found = proc.log_problems()
            if found["count"]:
                notes.append(
                    f"{proc.name} log: {found['count']} warning/error lines, e.g. {found['examples'][:3]}"
                )


async def warm_up(deployment: Deployment, users: dict[str, Any], publish: bool) -> None:
    """One socket per instance and (optionally) one publish, so lazy imports happen before RSS is read."""
    name, token = users["listeners"][0]
    async with httpx.AsyncClient(timeout=30) as http:
        tickets = Tickets(http)
        for web in deployment.webs:
            sock = await open_socket(SocketSpec(web.port, name, token), tickets, "bench-warmup")
            await sock.ws.close()
        if publish:
            headers = {"Authorization": f"Token {users['publisher']}"} if users["publisher"] else {}
            response = await http.post(
                f"{deployment.webs[0].url}/api/v1/messages/",
                json={"topic": "bench-warmup", "event": "warmup", "payload": {}},
                headers=headers,
            )
            if response.status_code != 202:
                raise RuntimeError(f"warm-up publish: {response.status_code} {response.text[:300]}")


def rss(procs: list[Proc]) -> dict[str, int]:
    return {p.name: common.rss_kib(p.pid) or 0 for p in procs}


def split_sockets(
    count: int, ports: list[int], listeners: list[list[Any]], processes: int
) -> list[list[dict[str, Any]]]:
    """Socket j goes to instance j % instances, user j % users, client process j % processes."""
    shares: list[list[dict[str, Any]]] = [[] for _ in range(processes)]
    for j in range(count):
        user, token = listeners[j % len(listeners)]
        shares[j % processes].append({"port": ports[j % len(ports)], "user": user, "token": token})
    return shares
