"""A three-node RabbitMQ cluster on this machine, for tests that kill nodes (no Docker).

As RabbitMQ's "cluster on a single machine" guide does: every node has its own node name,
AMQP and distribution ports, data and log folders, and its OWN CONFIG FILE (the machine's
/etc/rabbitmq/rabbitmq.conf pins the listener to 5672, which belongs to the machine's broker
and is never touched here). The nodes share an Erlang cookie of their own, passed on the
command line of the servers and of every `rabbitmqctl`, so they cannot reach or be reached by
the machine's broker (which keeps the cookie in /var/lib/rabbitmq).

    cluster = RabbitCluster().start()   # three nodes, clustered (about 20-40 s on 2 cores)
    cluster.urls                        # their AMQP URLs, in node order
    cluster.kill(node)                  # SIGKILL the node's Erlang VM
    cluster.restart(node)               # start it again on its data folder: it rejoins
    cluster.stop()                      # stop every node, remove every folder

    python -m tests.support.rabbit_cluster   # start one, print its AMQP_URL, stop on Enter
"""

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from tests.support.processes import free_port
from tests.support.rabbit import _has_user, _port_open
from tests.support.waiting import wait_until

START_TIMEOUT = 120.0
CTL_TIMEOUT = 60.0


def rabbitmq_installed() -> bool:
    return shutil.which("rabbitmq-server") is not None and shutil.which("rabbitmqctl") is not None


class RabbitNode:
    """One node: `rabbitmq-server` with its own name, ports, folders and config file."""

    def __init__(self, name: str, cookie: str, base: Path) -> None:
        self.name = name
        self.cookie = cookie
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = base / name.split("@", 1)[0]
        self.process: subprocess.Popen | None = None
        self._log: BinaryIO | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid_file(self) -> Path:
        return self.dir / "node.pid"

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            # guest may log in from 127.0.0.1 only: the default, said for whoever reads this.
            "loopback_users.guest = true\n"
            # The tests kill nodes on purpose: no need to wait for a peer at boot beyond this.
            "mnesia_table_loading_retry_timeout = 10000\n"
            "mnesia_table_loading_retry_limit = 12\n"
        )
        if _has_user("rabbitmq"):
            # Debian's wrapper runs the node as the rabbitmq user: it must own its folders.
            for path in [self.dir, *self.dir.rglob("*")]:
                shutil.chown(path, "rabbitmq", "rabbitmq")

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-setcookie {self.cookie}",
        }

    def start(self) -> "RabbitNode":
        """Launch the node (on its existing data folder, if any); `wait_started` waits for it."""
        self._prepare()
        self.pid_file.unlink(missing_ok=True)
        self._log = open(self.dir / "server.out", "ab")
        self.process = subprocess.Popen(
            ["rabbitmq-server"],
            env=self.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_started(self, timeout: float = START_TIMEOUT) -> None:
        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            return _port_open(self.port)

        wait_until(up, timeout, interval=0.25, what=f"RabbitMQ node {self.name}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.dir / "server.out").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True) -> str:
        """`rabbitmqctl -n NODE ARGS` with the cluster's cookie; its standard output."""
        return self._cli("rabbitmqctl", *args, timeout=timeout, check=check)

    def queues_cli(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        return self._cli("rabbitmq-queues", *args, timeout=timeout)

    def _cli(self, tool: str, *args: str, timeout: float, check: bool = True) -> str:
        done = subprocess.run(
            [tool, "-n", self.name, "--erlang-cookie", self.cookie, *args],
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} on {self.name}: {done.stdout}{done.stderr}")
        return done.stdout

    def beam_pid(self) -> int:
        """The process id of the node's Erlang VM (not of the wrappers that started it)."""
        pid = wait_until(self._read_pid, 30, interval=0.1, what=f"{self.name}'s pid file")
        assert pid is not None
        return pid

    def _read_pid(self) -> int | None:
        try:
            text = self.pid_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the node's VM, as a crash or a lost machine would, and reap its wrappers."""
        pid = self.beam_pid()
        os.kill(pid, signal.SIGKILL)
        assert self.process is not None
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        wait_until(lambda: not _port_open(self.port), 10, what=f"{self.name} to stop listening")
        self._close_log()

    def stop(self) -> None:
        """Stop the node cleanly (`rabbitmqctl stop`), killing it if that does not work."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                self.ctl("stop", timeout=60, check=False)
            except (subprocess.SubprocessError, OSError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pid = self._read_pid()
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class RabbitCluster:
    """Three (or `size`) clustered nodes named rt-test-<id>-a@localhost, -b, -c..."""

    def __init__(self, size: int = 3) -> None:
        self.id = uuid.uuid4().hex[:6]
        self.cookie = secrets.token_hex(16).upper()
        self.base = Path(tempfile.mkdtemp(prefix="rt-rabbit-cluster-"))
        if _has_user("rabbitmq"):
            shutil.chown(self.base, "rabbitmq", "rabbitmq")
        self.nodes = [
            RabbitNode(f"rt-test-{self.id}-{chr(ord('a') + n)}@localhost", self.cookie, self.base)
            for n in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """Every node's URL, comma-separated: the AMQP_URL of a deployment on this cluster."""
        return ",".join(self.urls)

    def start(self, timeout: float = START_TIMEOUT) -> "RabbitCluster":
        """Start every node, then join the others to the first; stops everything on failure."""
        try:
            for node in self.nodes:
                node.start()
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda node: node.wait_started(timeout), self.nodes))
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.name)
                node.ctl("start_app")
            self.wait_clustered(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def node(self, name_or_port: str | int) -> RabbitNode:
        for node in self.nodes:
            if name_or_port in (node.name, node.port):
                return node
        raise KeyError(name_or_port)

    def running_nodes(self, via: RabbitNode | None = None) -> set[str]:
        """The names of the running members, as one live node sees them."""
        via = via or next(node for node in self.nodes if node.running)
        status = via.ctl("eval", "rabbit_nodes:all_running().", timeout=30)
        return set(re.findall(r"'?([\w.-]+@[\w.-]+)'?", status))

    def wait_clustered(
        self, timeout: float = START_TIMEOUT, nodes: Iterable[RabbitNode] | None = None
    ) -> None:
        """Until every node of `nodes` (default: all) runs as a member of the cluster."""
        expected = {node.name for node in (nodes if nodes is not None else self.nodes)}

        def clustered() -> bool:
            try:
                return expected <= self.running_nodes()
            except (RuntimeError, subprocess.SubprocessError):
                return False

        wait_until(clustered, timeout, interval=0.5, what=f"{sorted(expected)} running in the cluster")

    def kill(self, node: RabbitNode) -> None:
        node.kill()

    def restart(self, node: RabbitNode, timeout: float = START_TIMEOUT) -> None:
        """Start a stopped or killed node on its data folder; it rejoins the cluster by itself."""
        node.start()
        node.wait_started(timeout)
        self.wait_clustered(timeout)

    def queues(self, *columns: str, vhost: str = "/") -> dict[str, list[str]]:
        """{queue name: its `columns` of `rabbitmqctl list_queues`}, as a live node sees them."""
        via = next(node for node in self.nodes if node.running)
        out = via.ctl("list_queues", "-p", vhost, "name", *columns, "--quiet", "--no-table-headers")
        found = {}
        for line in out.splitlines():
            name, *values = line.split("\t")
            if len(values) == len(columns):
                found[name] = [value.strip() for value in values]
        return found

    def queue_leaders(self, vhost: str = "/") -> dict[str, str]:
        """{queue name: node of its leader (quorum queues) or of its process (classic ones)}."""
        leaders = {}
        for name, (leader, pid) in self.queues("leader", "pid", vhost=vhost).items():
            home = re.match(r"<([\w.-]+@[\w.-]+?)\.\d+\.\d+\.\d+>", pid)
            leaders[name] = leader or (home.group(1) if home else "")
        return leaders

    def queue_members(self, queue: str, vhost: str = "/") -> list[str]:
        """The nodes that hold a replica of quorum queue `queue`."""
        return re.findall(r"[\w.-]+@[\w.-]+", self.queues("members", vhost=vhost)[queue][0])

    def bindings_of(self, routing_key: str, vhost: str = "/") -> list[str]:
        """The queues bound with `routing_key` (to any exchange), as a live node sees them."""
        via = next(node for node in self.nodes if node.running)
        out = via.ctl(
            "list_bindings", "-p", vhost, "destination_name", "routing_key", "--quiet", "--no-table-headers"
        )
        return sorted(
            name
            for name, _, key in (line.partition("\t") for line in out.splitlines())
            if key.strip() == routing_key
        )

    def connection_nodes(self, connection_name: str) -> list[RabbitNode]:
        """The nodes that hold an AMQP connection whose client named itself `connection_name`
        (aio-pika's `client_properties={"connection_name": ...}`: the RT_INSTANCE_ID)."""
        via = next(node for node in self.nodes if node.running)
        out = via.ctl("list_connections", "pid", "client_properties", "--quiet", "--no-table-headers")
        held = []
        for line in out.splitlines():
            pid, _, properties = line.partition("\t")
            node = re.match(r"<([\w.-]+@[\w.-]+?)\.\d+\.\d+\.\d+>", pid.strip())
            if node and f'{{"connection_name","{connection_name}"}}' in properties:
                held.append(self.node(node.group(1)))
        return held

    def stop(self) -> None:
        """Stop every node and remove every folder."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(), self.nodes))
        shutil.rmtree(self.base, ignore_errors=True)


def main() -> None:
    started = time.monotonic()
    cluster = RabbitCluster().start()
    print(f"cluster up in {time.monotonic() - started:.1f}s")
    print(f"AMQP_URL={cluster.amqp_url}")
    for node in cluster.nodes:
        print(f"  {node.name}  port {node.port}  (rabbitmqctl -n {node.name} --erlang-cookie {node.cookie})")
    try:
        input("Enter stops it... ")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
