"""Real processes for tests and benchmarks: free ports, a clean environment, Daphne and workers.

Django-free on purpose: the benchmarks' orchestrating process imports it too, and it never
imports Django (its servers and workers get their settings from the environment, as deployed).
"""

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.waiting import wait_until

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(PYTHON).parent
PROJECT_APP = "realtime_project.asgi:application"
# Seconds a process may take to become ready (two cores, shared with other runs).
START_TIMEOUT = 30.0
# Settings of the calling shell's own deployment or test run: a process started here gets
# exactly the settings it is given, never one of these by accident.
DEPLOYMENT_PREFIXES = ("RT_", "DJANGO_", "PYTEST_", "DATABASE_", "BASELINE_")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environ() -> dict[str, str]:
    """This process's environment without deployment settings, with unbuffered Python output."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(DEPLOYMENT_PREFIXES)}
    return env | {"PYTHONUNBUFFERED": "1"}


def daphne_argv(port: int, app: str = PROJECT_APP) -> list[str]:
    """A web instance's command (CONTRACT §1)."""
    return [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), app]


def worker_argv(concurrency: int) -> list[str]:
    """A worker's command (CONTRACT §1)."""
    return [PYTHON, "manage.py", "run_workers", "--concurrency", str(concurrency)]


def proc_status(pid: int, name: str) -> int | None:
    """A number from /proc/<pid>/status (VmRSS is in KiB), None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kib(pid: int) -> int | None:
    return proc_status(pid, "VmRSS")


@dataclass
class Proc:
    """A server or worker in its own session, its output appended to `log_path`; stopped by PID."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int | None = None
    process: subprocess.Popen | None = None
    killed: bool = False

    def start(self) -> "Proc":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def crashed(self) -> bool:
        """Exited on its own with an error: not killed here, not ended by SIGTERM."""
        return (
            self.process is not None
            and self.process.poll() not in (None, 0, -signal.SIGTERM)
            and not self.killed
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until `/readyz` answers 200 (CONTRACT §1); fail at once if the process exits."""

        def ready() -> bool:
            self._check_alive()
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait(ready, timeout, f"{self.name} /readyz")

    def wait_log(self, needle: str, timeout: float = START_TIMEOUT) -> None:
        """Until `needle` shows in the process's output."""

        def logged() -> bool:
            self._check_alive()
            return needle in self.log_path.read_text(errors="replace")

        self._wait(logged, timeout, f"{needle!r} in the log of {self.name}")

    def _check_alive(self) -> None:
        if not self.alive:
            raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")

    def _wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        try:
            wait_until(predicate, timeout, interval=0.1, what=what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}:\n{self.log_tail()}") from None

    def signal(self, signum: int) -> None:
        if self.alive:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, on purpose (`crashed` stays false), and reap it."""
        self.killed = True
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
        if self.process is None:
            return None
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %s) ignored SIGTERM for %.0fs: SIGKILL", self.name, self.pid, timeout)
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_problems(self, limit: int = 8) -> dict[str, Any]:
        """Count the WARNING/ERROR/CRITICAL/Traceback lines of the log, with a few examples."""
        if not self.log_path.exists():
            return {"count": 0, "examples": []}
        bad = [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if (" WARNING " in line or " ERROR " in line or "Traceback" in line or " CRITICAL " in line)
            # Django logs each 503 of /readyz (polled while the instance connects) as an ERROR.
            and "Service Unavailable: /readyz" not in line
        ]
        return {"count": len(bad), "examples": bad[:limit]}


def stop_all(procs: list[Proc], timeout: float = 15.0) -> None:
    """Stop every process, the others too when one of them fails to stop."""
    for proc in procs:
        try:
            proc.stop(timeout)
        except Exception:
            logger.exception("stopping %s", proc.name)
