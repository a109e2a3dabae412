"""A test's own deployment: Daphne web instances and `run_workers` workers as real processes.

Each process gets the test's database and namespace through the environment, exactly as a
deployment would, and its output goes to a log file under artifacts/ for post-mortems.
"""

from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection

from tests.support.broker import wait_consumers
from tests.support.processes import (
    ROOT,
    START_TIMEOUT,
    Proc,
    clean_environ,
    daphne_argv,
    free_port,
    stop_all,
    worker_argv,
)
from tests.support.waiting import wait_until

# Older names, still imported by some test modules: defined in tests/support/processes.py
# and tests/support/waiting.py.
__all__ = ["ROOT", "Cluster", "Proc", "free_port", "test_database_url", "wait_until"]

ARTIFACTS = ROOT / "artifacts" / "logs"


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


@dataclass
class Cluster:
    """A deployment of one test: web instances and workers sharing a namespace and database."""

    namespace: str
    database_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    webs: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)

    def env(self, instance_id: str, **extra: str) -> dict[str, str]:
        return (
            clean_environ()
            | {
                "DJANGO_SETTINGS_MODULE": "realtime_project.settings",
                "DJANGO_DEBUG": "1",
                "DJANGO_SECRET_KEY": settings.SECRET_KEY,
                "DATABASE_URL": self.database_url,
                "AMQP_URL": settings.AMQP_URL,
                "RT_NAMESPACE": self.namespace,
                "RT_INSTANCE_ID": instance_id,
                "RT_DIAGNOSTICS": "1",
                "RT_INSTANCE_QUEUE_EXPIRES_MS": "60000",
            }
            | self.extra_env
            | extra
        )

    def _proc(self, name: str, argv: list[str], port: int | None, extra: dict[str, str]) -> Proc:
        log_path = ARTIFACTS / f"{self.namespace}-{name}.log"
        return Proc(name=name, argv=argv, env=self.env(name, **extra), log_path=log_path, port=port).start()

    def add_web(self, name: str | None = None, port: int | None = None, **extra: str) -> Proc:
        name = name or f"web-{len(self.webs) + 1}"
        port = port or free_port()
        proc = self._proc(name, daphne_argv(port), port, extra)
        self.webs.append(proc)
        return proc

    def add_worker(self, name: str | None = None, concurrency: int = 4, **extra: str) -> Proc:
        name = name or f"worker-{len(self.workers) + 1}"
        proc = self._proc(name, worker_argv(concurrency), None, extra)
        self.workers.append(proc)
        return proc

    def wait_workers_consuming(self, count: int | None = None, timeout: float = START_TIMEOUT) -> None:
        """Ready means consuming `<ns>.inbound` (CONTRACT §1)."""
        expected = count if count is not None else sum(1 for w in self.workers if w.alive)
        wait_consumers(f"{self.namespace}.inbound", expected, self.workers, timeout=timeout)

    def instance_ids(self) -> list[str]:
        return [proc.name for proc in self.webs]

    def stop(self) -> None:
        stop_all(self.webs + self.workers)
