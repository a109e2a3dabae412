"""Shared pieces of the benchmarks: deployments' environments, databases, users, statistics.

The orchestrating process never imports Django: the servers, the workers and the one-off
database tasks (bench/tasks.py, migrate) run as subprocesses with the benchmark's environment,
exactly as a deployment would run them. Processes, ports and broker helpers are the tests'
(tests/support/), so a benchmark starts and watches its servers exactly as the tests do.
"""

import json
import math
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.support.processes import (
    PROJECT_APP,
    PYTHON,
    ROOT,
    Proc,
    clean_environ,
    daphne_argv,
    free_port,
    proc_status,
    rss_kib,
)

# Re-exported for the benchmark scripts (`common.rss_kib(...)`, `from bench.common import ROOT`).
__all__ = ["PROJECT_APP", "PYTHON", "ROOT", "Proc", "proc_status", "rss_kib"]

BENCH = ROOT / "bench"
LOGS = BENCH / "logs"
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DEFAULT_PG_URL = "postgres://postgres@127.0.0.1:5432/rt_bench"
# Every phase of every benchmark ends by this many seconds, whatever happens.
PHASE_TIMEOUT = 120.0
START_TIMEOUT = 45.0
# Seconds a server may take to drain its sockets after SIGTERM before it is killed.
STOP_TIMEOUT = 30.0
BASELINE_APP = "bench.baseline.asgi:application"
EXIT_VIOLATION = 3
# One secret for every process this benchmark starts: a ticket from one instance is valid on the other.
SECRET_KEY = "bench-" + secrets.token_hex(24)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft limit on open files (inherited by every process started after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log(f"could not raise the open-files limit to {target}: {exc}")
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU time a process has used so far (all its threads), from /proc/<pid>/stat;
    with `reaped_children`, also that of the children it has waited for (exited ones)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime and stime are fields 14 and 15, the reaped
    # children's cutime and cstime 16 and 17.
    ticks = fields[11:15] if reaped_children else fields[11:13]
    return sum(int(value) for value in ticks) / os.sysconf("SC_CLK_TCK")


def cpu_of(procs: list["Proc"]) -> float:
    return sum(cpu_seconds(p.pid) for p in procs if p.process is not None)


# The services a deployment needs, by the name the kernel gives their processes (/proc/<pid>/comm).
SERVICE_PROCESSES = {"postgres": "postgresql", "beam.smp": "rabbitmq", "redis-server": "redis"}


def service_cpu() -> dict[str, float]:
    """CPU seconds used so far by this machine's PostgreSQL, RabbitMQ and Redis, each as a whole:
    every process of it (PostgreSQL's backends, WAL writer and autovacuum; the broker's
    schedulers) and the children it has reaped (a backend whose connection closed).

    A benchmark's throughput on a busy machine is bounded by all the CPU a message or frame
    costs, the services' share included; the services are the machine's, so the figure is only
    meaningful while nothing else uses them (as on a benchmark machine).
    """
    totals = dict.fromkeys(SERVICE_PROCESSES.values(), 0.0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            service = SERVICE_PROCESSES.get(Path(entry.path, "comm").read_text().strip())
        except OSError:
            continue
        if service is not None:
            totals[service] += cpu_seconds(int(entry.name), reaped_children=True)
    return totals


def service_cpu_since(before: dict[str, float]) -> dict[str, float]:
    """What each service spent since `before` (a `service_cpu()` reading)."""
    return {name: seconds - before.get(name, 0.0) for name, seconds in service_cpu().items()}


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


# --- processes ----------------------------------------------------------------------------


def project_env(database_url: str, namespace: str, run_id: str, **extra: str) -> dict[str, str]:
    env = clean_environ() | {
        "DJANGO_SETTINGS_MODULE": "realtime_project.settings",
        # Production settings (no DEBUG), as a deployment would run.
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DATABASE_URL": database_url,
        "AMQP_URL": AMQP_URL,
        "RT_NAMESPACE": namespace,
        "RT_INSTANCE_QUEUE_EXPIRES_MS": "60000",
        "BENCH_RUN": run_id,
    }
    env.update(extra)
    return env


def baseline_env(prefix: str, run_id: str, **extra: str) -> dict[str, str]:
    env = clean_environ() | {
        "DJANGO_SETTINGS_MODULE": "bench.baseline.settings",
        "BASELINE_PREFIX": prefix,
        "BASELINE_REDIS_URL": REDIS_URL,
        "BENCH_RUN": run_id,
    }
    env.update(extra)
    return env


def start_proc(name: str, argv: list[str], env: dict[str, str], port: int | None = None) -> Proc:
    """A server or worker of the run `env["BENCH_RUN"]`, logging to bench/logs/<run>-<name>.log."""
    log_path = LOGS / f"{env.get('BENCH_RUN', 'run')}-{name}.log"
    return Proc(name=name, argv=argv, env=env, log_path=log_path, port=port).start()


def daphne(name: str, env: dict[str, str], app: str) -> Proc:
    port = free_port()
    return start_proc(name, daphne_argv(port, app), env, port)


def run_python(env: dict[str, str], *args: str, timeout: float = PHASE_TIMEOUT) -> str:
    """`python ARGS` in the project folder with `env`: its output, or RuntimeError if it failed."""
    result = subprocess.run(
        [PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


# --- databases ----------------------------------------------------------------------------


@dataclass
class BenchDatabase:
    """A database made for one benchmark invocation and dropped afterwards."""

    url: str
    kind: str
    tmpdir: str | None = None
    keep: bool = False

    @classmethod
    def create(cls, database_url: str | None, keep: bool = False) -> "BenchDatabase":
        if not database_url or database_url.startswith("sqlite"):
            tmpdir = tempfile.mkdtemp(prefix="rt-bench-")
            return cls(f"sqlite:///{tmpdir}/bench.sqlite3", "sqlite", tmpdir=tmpdir, keep=keep)
        name = _pg_name(database_url)
        if "bench" not in name:
            raise SystemExit(
                f"refusing to drop and re-create {name!r}: a benchmark database name contains 'bench'"
            )
        _pg_admin(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        _pg_admin(database_url, f'CREATE DATABASE "{name}"')
        return cls(database_url, "postgresql", keep=keep)

    def drop(self) -> None:
        if self.keep:
            log(f"kept the database {self.url}")
            return
        if self.kind == "sqlite" and self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        elif self.kind == "postgresql":
            try:
                _pg_admin(self.url, f'DROP DATABASE IF EXISTS "{_pg_name(self.url)}" WITH (FORCE)')
            except Exception as exc:
                log(f"could not drop {self.url}: {exc}")


def _pg_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _pg_admin(url: str, sql: str) -> None:
    import psycopg

    parts = urlsplit(url)
    admin = urlunsplit(("postgresql", parts.netloc, "/postgres", parts.query, ""))
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def postgres_reachable(url: str) -> bool:
    try:
        _pg_admin(url, "SELECT 1")
    except Exception:
        return False
    return True


def prepare_project_database(db: BenchDatabase, listeners: int) -> dict[str, Any]:
    """Migrate, then create the publisher (notifications.add_message) and `listeners` users."""
    env = project_env(db.url, "bench-setup", "setup")
    started = time.monotonic()
    run_python(env, "manage.py", "migrate", "--noinput", timeout=300)
    log(f"migrated {db.kind} database in {time.monotonic() - started:.1f}s")
    spec = {"publisher": "bench-publisher", "prefix": "bench-l", "listeners": listeners}
    return json.loads(run_python(env, "-m", "bench.tasks", "users", json.dumps(spec)).splitlines()[-1])


def baseline_users(listeners: int) -> dict[str, Any]:
    """The baseline has no authentication: names only, for the same client code."""
    return {"publisher": None, "listeners": [[f"bench-l{i}", None] for i in range(listeners)]}


# --- broker and redis cleanup -------------------------------------------------------------


def delete_namespace(env: dict[str, str], instance_ids: list[str]) -> None:
    """Delete the queues and exchange of a run (tests/support/broker.py, with the run's settings)."""
    try:
        run_python(env, "-m", "tests.support.broker", env["RT_NAMESPACE"], *instance_ids, timeout=60)
    except Exception as exc:
        log(f"could not delete namespace {env['RT_NAMESPACE']}: {exc}")


def delete_redis_prefix(prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


# --- statistics ---------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


@dataclass
class Report:
    """The runs of one benchmark configuration and their summary (median, min, max)."""

    bench: str
    params: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        keys: list[str] = []
        for run in self.runs:
            for key, value in run.get("metrics", {}).items():
                if isinstance(value, (int, float)) and key not in keys:
                    keys.append(key)
        out = {}
        for key in keys:
            values = [
                run["metrics"][key] for run in self.runs if isinstance(run["metrics"].get(key), (int, float))
            ]
            if values:
                out[key] = {
                    "median": round(statistics.median(values), 3),
                    "min": round(min(values), 3),
                    "max": round(max(values), 3),
                }
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "params": self.params,
            "machine": machine(),
            "summary": self.summary(),
            "violations": self.violations,
            "runs": self.runs,
        }

    def print(self, labels: dict[str, str]) -> None:
        summary = self.summary()
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        print(f"\n== {self.bench}  {params}")
        print(f"   runs: {len(self.runs)} (median, then min-max over the runs)")
        for key, label in labels.items():
            if key not in summary:
                continue
            s = summary[key]
            spread = "" if len(self.runs) < 2 else f"   ({_fmt(s['min'])} - {_fmt(s['max'])})"
            print(f"   {label:<44} {_fmt(s['median']):>12}{spread}")
        for i, run in enumerate(self.runs, 1):
            for note in run.get("notes", []):
                print(f"   run {i}: {note}")
        if self.violations:
            bar = "!" * 78
            print(f"\n{bar}")
            for violation in self.violations:
                print(f"!!! {violation}")
            print(bar)
            sys.stdout.flush()
            print(f"{bar}\n!!! " + "\n!!! ".join(self.violations) + f"\n{bar}", file=sys.stderr)


def _fmt(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def emit(report: Report, labels: dict[str, str], as_json: bool, json_out: str | None) -> int:
    data = report.as_json()
    if json_out:
        Path(json_out).write_text(json.dumps(data, indent=2))
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        report.print(labels)
    return EXIT_VIOLATION if report.violations else 0


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"
