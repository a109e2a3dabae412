"""Real processes for cross-process tests: Daphne web instances and `run_workers` workers.

Each process gets the test's database and namespace through the environment, exactly as a
deployment would, and its output goes to a log file under artifacts/ for post-mortems.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "logs"
BIN = Path(sys.executable).parent
START_DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_database_url() -> str:
    """The URL of the database pytest-django set up, for the subprocesses to share."""
    params = connection.settings_dict
    if params["ENGINE"].endswith("sqlite3"):
        name = str(params["NAME"])
        if name == ":memory:" or "mode=memory" in name:
            raise RuntimeError("cross-process tests need a file or server database")
        return f"sqlite:///{name}"
    user = params.get("USER") or ""
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    host = params.get("HOST") or "127.0.0.1"
    port = f":{params['PORT']}" if params.get("PORT") else ""
    return f"postgres://{auth}{host}{port}/{params['NAME']}"


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    killed: bool = False

    def start(self) -> "Proc":
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"{self.env['RT_NAMESPACE']}-{self.name}.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = START_DEADLINE) -> None:
        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, interval=0.1, what=f"{self.name} /readyz")

    def signal(self, signum: int) -> None:
        if self.alive:
            self.process.send_signal(signum)

    def kill(self) -> None:
        self.killed = True
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Cluster:
    """A deployment of one test: web instances and workers sharing a namespace and database."""

    namespace: str
    database_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    webs: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)

    def env(self, instance_id: str, **extra: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RT_", "DJANGO_", "PYTEST_", "DATABASE_"))
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "realtime_project.settings",
                "DJANGO_DEBUG": "1",
                "DJANGO_SECRET_KEY": settings.SECRET_KEY,
                "DATABASE_URL": self.database_url,
                "AMQP_URL": settings.AMQP_URL,
                "RT_NAMESPACE": self.namespace,
                "RT_INSTANCE_ID": instance_id,
                "RT_DIAGNOSTICS": "1",
                "RT_INSTANCE_QUEUE_EXPIRES_MS": "60000",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        env.update(extra)
        return env

    def add_web(self, name: str | None = None, port: int | None = None, **extra: str) -> Proc:
        name = name or f"web-{len(self.webs) + 1}"
        port = port or free_port()
        argv = [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "realtime_project.asgi:application"]
        proc = Proc(name, argv, self.env(name, **extra), port=port).start()
        self.webs.append(proc)
        return proc

    def add_worker(self, name: str | None = None, concurrency: int = 4, **extra: str) -> Proc:
        name = name or f"worker-{len(self.workers) + 1}"
        argv = [sys.executable, "manage.py", "run_workers", "--concurrency", str(concurrency)]
        proc = Proc(name, argv, self.env(name, **extra)).start()
        self.workers.append(proc)
        return proc

    def wait_workers_consuming(self, count: int | None = None, timeout: float = START_DEADLINE) -> None:
        """Ready means consuming `<ns>.inbound` (CONTRACT §1)."""
        import asyncio

        from tests.support.broker import queue_stats

        expected = count if count is not None else sum(1 for w in self.workers if w.alive)

        def consuming() -> bool:
            for worker in self.workers:
                if (
                    worker.process is not None
                    and worker.process.poll() not in (None, 0, -15)
                    and not worker.killed
                ):
                    raise RuntimeError(f"{worker.name} exited early:\n{worker.log_tail()}")
            stats = asyncio.run(queue_stats(f"{self.namespace}.inbound"))
            return stats is not None and stats[1] >= expected

        wait_until(consuming, timeout, interval=0.2, what=f"{expected} workers consuming")

    def instance_ids(self) -> list[str]:
        return [proc.name for proc in self.webs]

    def stop(self) -> None:
        for proc in self.webs + self.workers:
            proc.stop()
