"""bin/run's database: without DATABASE_URL it runs a private PostgreSQL cluster of its own
(bin/lib.sh's start_private_postgres), and stops it when it stops."""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.broker import delete_namespace_sync
from tests.support.cluster import ROOT, free_port, wait_until

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
needs_postgres = pytest.mark.skipif(
    not PG_BINS, reason="PostgreSQL's programs are not installed (bin/run installs them)"
)


def pg_program(name: str) -> str:
    return str(PG_BINS[-1].parent / name)


def lib(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`script` in bash with bin/lib.sh sourced, as bin/run sources it."""
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; source "{ROOT}/bin/lib.sh"\n{script}'],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def psql(port: int, sql: str, db: str = "realtime") -> str:
    result = subprocess.run(
        [
            pg_program("psql"),
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            db,
            "-tAc",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def pg_home() -> Iterator[Path]:
    """A folder the postgres system user can reach (pytest's tmp_path is closed to other users)."""
    parent = Path(tempfile.mkdtemp(prefix="rt-pg-test-"))
    parent.chmod(0o755)
    home = parent / "postgres"
    try:
        yield home
    finally:
        if (home / "data" / "postmaster.pid").exists():  # a failed test's cluster: ours to stop
            lib(f'stop_private_postgres "{home}"')
        shutil.rmtree(parent, ignore_errors=True)


@needs_postgres
def test_the_private_cluster_starts_on_loopback_only_and_stops(pg_home):
    port = free_port()
    started = lib(f'start_private_postgres "{pg_home}" {port} realtime; echo "started=$PG_PRIVATE_STARTED"')
    assert started.returncode == 0, started.stderr
    assert "started=1" in started.stdout and "creating a private PostgreSQL cluster" in started.stderr
    assert psql(port, "SELECT current_database()") == "realtime"
    assert psql(port, "SHOW listen_addresses") == "127.0.0.1"
    assert psql(port, "SHOW unix_socket_directories") == ""
    hba = psql(port, "SELECT type, database, user_name, address, auth_method FROM pg_hba_file_rules")
    assert hba.splitlines() == ["host|{all}|{all}|127.0.0.1|trust"], hba
    if os.geteuid() == 0:
        assert (pg_home / "data").owner() == "postgres", "initdb refuses root: the postgres user owns it"

    # Already running: used as it is, and not this call's to stop.
    again = lib(f'start_private_postgres "{pg_home}" {port} realtime; echo "started=$PG_PRIVATE_STARTED"')
    assert again.returncode == 0 and "started=0" in again.stdout, again.stderr

    stopped = lib(f'stop_private_postgres "{pg_home}"')
    assert stopped.returncode == 0, stopped.stderr
    assert not port_open(port) and not (pg_home / "data" / "postmaster.pid").exists()

    # The next start keeps the data: no new cluster, the database is there.
    psql_port = free_port()
    restarted = lib(f'start_private_postgres "{pg_home}" {psql_port} realtime')
    assert restarted.returncode == 0 and "creating" not in restarted.stderr, restarted.stderr
    assert psql(psql_port, "SELECT 1") == "1"
    lib(f'stop_private_postgres "{pg_home}"')


@needs_postgres
def test_a_taken_port_is_refused_with_a_clear_message(pg_home):
    taken = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        result = lib(f'start_private_postgres "{pg_home}" {taken} realtime')
    assert result.returncode != 0
    assert f"port {taken} is taken: set RT_PG_PORT" in result.stderr


@needs_postgres
@pytest.mark.slow
def test_bin_run_without_database_url_runs_on_its_private_postgres(pg_home, namespace, tmp_path):
    pg_port, lb_port, web_ports = free_port(), free_port(), [free_port(), free_port()]
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RT_", "PYTEST_", "DJANGO_", "DATABASE_"))
    }
    env |= {
        "RT_PG_DIR": str(pg_home),
        "RT_PG_PORT": str(pg_port),
        "RT_NAMESPACE": namespace,
        "RT_LB_PORT": str(lb_port),
        "RT_WEB_PORTS": ",".join(map(str, web_ports)),
        "RT_WORKERS": "1",
        "RT_DEMO_USER": "demo",
        "TMPDIR": str(tmp_path),
    }
    log_path = tmp_path / "bin-run.log"
    with open(log_path, "wb") as log:
        run = subprocess.Popen(
            [str(ROOT / "bin" / "run")],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output() -> str:
        return log_path.read_text(errors="replace")

    def ready() -> bool:
        if run.poll() is not None:
            raise RuntimeError(f"bin/run exited early:\n{output()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{web_ports[0]}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 90, interval=0.2, what="bin/run's first instance")
        assert f"starting the private PostgreSQL on 127.0.0.1:{pg_port}" in output()
        assert re.search(r"database: postgres://…realtime", output()), output()[-3000:]
        # The schema and the demo user are in the private cluster: that is where the processes write.
        assert int(psql(pg_port, "SELECT count(*) FROM django_migrations")) > 0
        assert psql(pg_port, "SELECT username FROM auth_user") == "demo"

        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C
        assert run.wait(timeout=60) == 130, output()[-3000:]
        assert "stopping the private PostgreSQL" in output()
        assert not port_open(pg_port), "the private PostgreSQL outlived bin/run"
        assert not (pg_home / "data" / "postmaster.pid").exists()
        assert (pg_home / "data" / "PG_VERSION").exists(), "the data stays for the next run"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=10)
        for pid in re.findall(r"started \(pid=(\d+)\)", output()):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        delete_namespace_sync(namespace, ["web-1", "web-2", "worker-1"])
