"""A private RabbitMQ node for tests that stop and start the broker (the shared one stays up)."""

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.support.processes import free_port
from tests.support.waiting import wait_until


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class PrivateRabbit:
    """`rabbitmq-server` on its own ports and data folder; `restart()` is stop_app + start_app."""

    def __init__(self) -> None:
        self.name = f"rttest-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rt-rabbit-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, timeout: float = 90) -> "PrivateRabbit":
        (self.dir / "enabled_plugins").write_text("[].\n")
        if _has_user("rabbitmq"):
            # Debian's wrapper runs the node as the rabbitmq user: it must own the data folder.
            shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "none"),
        }
        self.env = env
        self.log = open(self.dir / "server.log", "ab")
        self.process = subprocess.Popen(
            ["rabbitmq-server"], env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_until(lambda: self._up(), timeout, interval=0.25, what="private RabbitMQ node")
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited: {(self.dir / 'server.log').read_text()[-2000:]}")
        return _port_open(self.port)

    def ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            check=True,
            timeout=timeout,
            capture_output=True,
        )

    def stop_app(self) -> None:
        self.ctl("stop_app")
        wait_until(lambda: not _port_open(self.port), 30, what="broker to stop listening")

    def start_app(self) -> None:
        self.ctl("start_app")
        wait_until(lambda: _port_open(self.port), 60, what="broker to listen again")

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            self.ctl("stop", timeout=30)
        except (subprocess.SubprocessError, OSError):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
