"""The deployment: docker-compose.yml, the Dockerfile, nginx as the load balancer, and bin/run.

No Docker engine runs here, so the compose file is validated against the Compose
Specification's JSON schema (tests/data/compose-spec.json, see compose-spec.SOURCE.md) and
checked against the contract, never started. nginx is real: the balancer config of
deploy/nginx.py is run in front of two real Daphne instances.
"""

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml

from deploy.nginx import render_nginx_conf, write_nginx_conf
from tests.support import cluster as cluster_support
from tests.support.broker import delete_namespace
from tests.support.clients import LiveSocket, open_socket, publish
from tests.support.processes import ROOT, Proc, clean_environ, free_port
from tests.support.waiting import wait_until

DATA = Path(__file__).parent / "data"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (bin/test installs it)")

# CONTRACT §1, the commands of the processes.
WEB_COMMAND = re.compile(r"^daphne -b \S+ -p \d+ realtime_project\.asgi:application$")
WORKER_COMMAND = ["python", "manage.py", "run_workers"]
MIGRATE_COMMAND = ["python", "manage.py", "migrate", "--noinput"]

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, $VAR; $$ escapes.
INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


# --- docker-compose.yml, .env.example, Dockerfile ---------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


def interpolate(value, env: dict[str, str]):
    """Substitute ${...} in every string of a loaded compose file, as `docker compose config` does."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        is_set, current = name in env, env.get(name)
        if op in (":-", "-"):
            return current if (current if op == ":-" else is_set) else arg
        if op in (":?", "?"):
            if not (current if op == ":?" else is_set):
                raise ValueError(f"{name} is required: {arg}")
            return current
        if op in (":+", "+"):
            return arg if (current if op == ":+" else is_set) else ""
        return current or ""

    return INTERPOLATION.sub(substitute, value)


def referenced_variables(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(referenced_variables(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(referenced_variables(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    return {m["braced"] or m["named"] for m in INTERPOLATION.finditer(value) if not m["escaped"]}


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ROOT / ".env.example")


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose(compose_raw, env_example) -> dict:
    """docker-compose.yml as `docker compose config` would see it with .env.example as .env."""
    return interpolate(compose_raw, env_example)


@pytest.fixture(scope="module")
def compose_validator():
    schema = json.loads((DATA / "compose-spec.json").read_text())
    # It says draft-07 in a spelling ("https://json-schema.org/draft-07/schema", no "#") that
    # jsonschema does not look up by itself.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_validates_against_the_compose_specification(compose, compose_validator):
    errors = sorted(compose_validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_is_not_vacuous(compose, compose_validator):
    """The vendored schema does reject what docker compose would reject."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["web"]["depends_on"]["migrate"]["condition"] = "service_finished"
    broken["services"]["worker"]["restart_policy"] = "always"
    messages = [e.message for e in compose_validator.iter_errors(broken)]
    assert any("service_finished" in m for m in messages), messages
    assert any("restart_policy" in m for m in messages), messages


def test_every_variable_the_compose_file_uses_is_in_env_example(compose_raw, env_example):
    used = referenced_variables(compose_raw)
    assert used, "the compose file is expected to take its settings from .env"
    assert not used - env_example.keys(), f"missing from .env.example: {sorted(used - env_example.keys())}"
    for name in ("DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS", "AMQP_URL", "DATABASE_URL", "RT_NAMESPACE"):
        assert name in env_example and name in used, name
    # The secrets are placeholders that say so, and the URLs name the services' own credentials.
    assert "change-me" in env_example["DJANGO_SECRET_KEY"]
    assert env_example["DJANGO_DEBUG"] == "0"
    assert "localhost" in env_example["DJANGO_ALLOWED_HOSTS"].split(","), "the healthchecks use it"
    assert env_example["DATABASE_URL"] == (
        f"postgres://{env_example['POSTGRES_USER']}:{env_example['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{env_example['POSTGRES_DB']}"
    )
    assert env_example["AMQP_URL"] == (
        f"amqp://{env_example['RABBITMQ_DEFAULT_USER']}:{env_example['RABBITMQ_DEFAULT_PASS']}@rabbitmq:5672/"
    )


def test_the_compose_file_refuses_to_start_without_the_secrets(compose_raw, env_example):
    for name in ("DJANGO_SECRET_KEY", "DATABASE_URL", "AMQP_URL", "POSTGRES_PASSWORD"):
        without = {key: value for key, value in env_example.items() if key != name}
        with pytest.raises(ValueError, match=name):
            interpolate(compose_raw, without)


def test_compose_services_are_the_contracts_processes(compose):
    services = compose["services"]
    # The optional `monitoring` profile (Prometheus, Grafana) aside.
    always = {name for name, service in services.items() if "monitoring" not in service.get("profiles", [])}
    assert always == {"rabbitmq", "postgres", "migrate", "web", "worker", "nginx"}

    assert re.match(r"rabbitmq:3(\.\d+)?-management", services["rabbitmq"]["image"])
    assert services["rabbitmq"]["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert services["rabbitmq"]["hostname"], "RabbitMQ's data lives under its node (host) name"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])

    app_services = ("migrate", "web", "worker")
    for name in app_services:
        service = services[name]
        assert service["build"] == "." and service["image"] == services["web"]["image"], name
        env = service["environment"]
        for setting in ("DJANGO_SECRET_KEY", "DATABASE_URL", "AMQP_URL", "RT_NAMESPACE"):
            assert env[setting], f"{name} lacks {setting}"
        assert env["DATABASE_URL"].startswith("postgres://") and "@postgres:5432/" in env["DATABASE_URL"]
        assert "@rabbitmq:5672" in env["AMQP_URL"]
        # Every process of a deployment gets the same settings (CONTRACT §1, RT_DIAGNOSTICS).
        assert env == services["web"]["environment"], name

    assert services["migrate"]["command"] == MIGRATE_COMMAND
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"

    web = services["web"]
    assert "command" not in web, "web instances run the image's CMD (the contract's daphne command)"
    assert "RT_INSTANCE_ID" not in web["environment"], "replicas name themselves: host name + pid"
    assert web["deploy"]["replicas"] >= 2
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert web["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert "healthcheck" not in web, "web instances use the image's HEALTHCHECK on /healthz"

    worker = services["worker"]
    assert worker["command"][:3] == WORKER_COMMAND
    assert worker["deploy"]["replicas"] == 2
    assert worker["healthcheck"] == {"disable": True}, "a worker serves no /healthz"
    assert services["migrate"]["healthcheck"] == {"disable": True}
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"

    nginx = services["nginx"]
    assert "./deploy/nginx.compose.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    assert nginx["depends_on"]["web"]["condition"] == "service_healthy"
    # Only the balancer (and RabbitMQ's management UI, on loopback) is reachable from outside.
    assert [p.split(":")[-1] for p in nginx["ports"]] == ["80"]
    assert all(p.startswith("127.0.0.1:") for p in services["rabbitmq"].get("ports", []))
    for name in ("postgres", "migrate", "web", "worker"):
        assert "ports" not in services[name], name


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_builds_a_non_root_web_instance_with_a_healthcheck():
    instructions = dockerfile_instructions()
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in instructions:
        by_keyword.setdefault(keyword, []).append(rest)

    assert by_keyword["FROM"] == ["python:3.11-slim"]
    assert any("pip install -r requirements.txt" in run for run in by_keyword["RUN"])
    users = by_keyword["USER"]
    assert users and users[-1] not in ("root", "0"), "the app must not run as root"
    # The last CMD is the contract's web instance, in exec form, listening where nginx looks.
    cmd = json.loads(by_keyword["CMD"][-1])
    assert WEB_COMMAND.match(shlex.join(cmd)), cmd
    assert cmd[cmd.index("-b") + 1] == "0.0.0.0"
    port = cmd[cmd.index("-p") + 1]
    assert by_keyword["EXPOSE"] == [port]
    assert f"web:{port}" in (ROOT / "deploy" / "nginx.compose.conf").read_text()
    healthcheck = by_keyword["HEALTHCHECK"][-1]
    probe = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"]
    compile(probe[2], "HEALTHCHECK", "exec")
    assert f"127.0.0.1:{port}/healthz" in probe[2]


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".env", ".git", ".venv", "db.sqlite3*", "artifacts"):
        assert entry in ignored, entry


def directive_values(conf: str, name: str) -> list[str]:
    """The arguments of every `name ...;` directive (blocks such as `server {` are not directives)."""
    return [m.group(1).strip() for m in re.finditer(rf"^\s*{name}\s+([^;{{}}]*);", conf, re.MULTILINE)]


def assert_websocket_aware(conf: str) -> None:
    assert directive_values(conf, "proxy_http_version") == ["1.1"]
    headers = {
        value.split()[0]: value.split(None, 1)[1] for value in directive_values(conf, "proxy_set_header")
    }
    assert headers["Upgrade"] == "$http_upgrade"
    assert headers["Connection"] == "$connection_upgrade"
    assert re.search(r"map \$http_upgrade \$connection_upgrade \{\s*default upgrade;\s*''\s+close;", conf)
    assert headers["Host"] in ("$host", "$http_host")
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert headers["X-Forwarded-Proto"] == "$scheme"
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = directive_values(conf, timeout)
        assert int(value.rstrip("s")) >= 3600, timeout
    assert re.search(r"^\s*least_conn;", conf, re.MULTILINE)
    servers = directive_values(conf, "server")
    assert servers and all("max_fails=" in s and "fail_timeout=" in s for s in servers)


def test_compose_nginx_config_is_websocket_aware_and_uses_dockers_dns():
    conf = (ROOT / "deploy" / "nginx.compose.conf").read_text()
    assert_websocket_aware(conf)
    assert directive_values(conf, "resolver")[0].startswith("127.0.0.11 ")
    (server,) = directive_values(conf, "server")
    assert server.startswith("web:") and " resolve" in server
    assert re.search(r"^\s*zone\s+\S+\s+\d+k;", conf, re.MULTILINE), "`resolve` needs a shared zone"


def nginx_test(conf: Path, prefix: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NGINX, "-t", "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_nginx
def test_compose_nginx_config_passes_nginx_t(tmp_path):
    """Checked with this machine's nginx: `resolve` (nginx >= 1.27.3) and the host `web` (Docker's
    DNS) are replaced by a loopback address, everything else is tested as written."""
    conf = (ROOT / "deploy" / "nginx.compose.conf").read_text()
    local = conf.replace("server web:8000 resolve ", "server 127.0.0.1:8000 ")
    assert local != conf
    (tmp_path / "logs").mkdir()
    (tmp_path / "default.conf").write_text(local)
    main = tmp_path / "nginx.conf"
    temp = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n" for kind in ("proxy", "fastcgi", "uwsgi", "scgi")
    )
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n"
        f"    client_body_temp_path {tmp_path}/client_body;\n{temp}"
        f"    include {tmp_path}/default.conf;\n}}\n"
    )
    result = nginx_test(main, tmp_path)
    assert result.returncode == 0, result.stderr


# --- deploy/nginx.py: the local balancer --------------------------------------------------------


def test_rendered_balancer_config_is_websocket_aware(tmp_path):
    conf = render_nginx_conf(8000, [8001, 8002], tmp_path)
    assert_websocket_aware(conf)
    assert directive_values(conf, "listen") == ["127.0.0.1:8000"]
    assert [s.split()[0] for s in directive_values(conf, "server")] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    # Everything nginx writes stays in its folder: never the system's /etc/nginx or /var.
    for name in ("pid", "error_log", "access_log") + tuple(
        f"{kind}_temp_path" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    ):
        (value,) = directive_values(conf, name)
        assert value.startswith(str(tmp_path.resolve())), (name, value)
    assert "/etc/nginx" not in conf and "include" not in conf
    with pytest.raises(ValueError):
        render_nginx_conf(8000, [], tmp_path)


def test_nginx_py_command_line_writes_the_config_and_prints_its_path(tmp_path):
    python = sys.executable
    result = subprocess.run(
        [python, "deploy/nginx.py", "--listen", "18000", "--upstream", "18001", "--upstream", "18002"]
        + ["--dir", str(tmp_path / "lb")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    path = Path(result.stdout.strip())
    assert path == (tmp_path / "lb" / "nginx.conf").resolve()
    assert path.read_text() == render_nginx_conf(18000, [18001, 18002], tmp_path / "lb")


@needs_nginx
def test_rendered_balancer_config_passes_nginx_t(tmp_path):
    conf = write_nginx_conf(free_port(), [free_port(), free_port()], tmp_path)
    result = nginx_test(conf, tmp_path)
    assert result.returncode == 0, result.stderr


# --- a real nginx in front of two real Daphne instances -----------------------------------------


def start_balancer(upstream_ports: list[int], workdir: Path) -> Proc:
    """nginx from deploy/nginx.py, in the foreground, stopped by its PID (SIGTERM is nginx's fast
    shutdown); its error log is the process's log."""
    port = free_port()
    conf = write_nginx_conf(port, upstream_ports, workdir)
    error_log = workdir / "logs" / "error.log"
    argv = [NGINX, "-p", str(workdir), "-e", str(error_log), "-c", str(conf), "-g", "daemon off;"]
    return Proc(name="nginx", argv=argv, env=dict(os.environ), log_path=error_log, port=port).start()


@pytest.fixture
def balanced(cluster, tmp_path):
    """Two web instances behind nginx (deploy/nginx.py), on free loopback ports."""
    if NGINX is None:
        pytest.skip("nginx is not installed (bin/test installs it)")
    webs = [cluster.add_web(), cluster.add_web()]
    for web in webs:
        web.wait_ready()
    balancer = start_balancer([web.port for web in webs], tmp_path / "nginx")
    try:
        balancer.wait_ready(timeout=15)
        yield balancer, webs
    finally:
        balancer.stop()


async def open_sockets(http: httpx.AsyncClient, balancer: Proc, users: list) -> list[LiveSocket]:
    # One after another, each staying open: least_conn then spreads them over the instances.
    return [await open_socket(http, balancer, user) for user in users]


async def test_sockets_through_nginx_land_on_both_instances_and_get_every_message_once_in_order(
    balanced, users
):
    balancer, _ = balanced
    listeners = [users["bob"], users["carol"]] * 10
    async with httpx.AsyncClient(timeout=30) as http:
        sockets = await open_sockets(http, balancer, listeners)
        landed = [s.welcome["instance"] for s in sockets]
        assert set(landed) == {"web-1", "web-2"}, landed
        assert min(landed.count("web-1"), landed.count("web-2")) >= 5, landed
        await asyncio.gather(
            *(s.request({"type": "subscribe", "topic": "lb"}, "subscribed") for s in sockets)
        )

        sent_ids = []
        for n in range(30):
            record = await publish(
                http, balancer, users["alice"], {"topic": "lb", "event": "n", "payload": n}
            )
            sent_ids.append(record["id"])
        for socket in sockets:
            await socket.wait_for(lambda s: len(s.messages) >= len(sent_ids), timeout=30, what="30 messages")
        # A last message marks the end: anything duplicated would have arrived before it.
        marker = await publish(http, balancer, users["alice"], {"topic": "lb", "event": "end"})
        for socket in sockets:
            await socket.wait_for(
                lambda s: s.messages and s.messages[-1]["id"] == marker["id"], what="marker"
            )
            assert [m["id"] for m in socket.messages] == sent_ids + [marker["id"]], (
                "lost, duplicated or reordered"
            )
            assert [m["payload"] for m in socket.messages[:-1]] == list(range(30))
        # Sockets through nginx stay usable both ways.
        assert (await sockets[0].request({"type": "ping"}, "pong"))["type"] == "pong"
        await asyncio.gather(*(s.close() for s in sockets))
        # The closing handshake went through nginx and back: a clean 1000, not 1006.
        assert {s.closed_code for s in sockets} == {1000}


async def test_a_stopped_instance_is_skipped_and_its_clients_reconnect_to_the_other(balanced, users):
    balancer, (web_1, web_2) = balanced
    async with httpx.AsyncClient(timeout=30) as http:
        sockets = await open_sockets(http, balancer, [users["bob"]] * 4)
        on_web_2 = [s for s in sockets if s.welcome["instance"] == "web-2"]
        assert on_web_2, [s.welcome["instance"] for s in sockets]

        await asyncio.to_thread(web_2.stop)  # SIGTERM: drain, then exit
        for socket in on_web_2:
            # Its close code (1001, going away) is the drain's business: tests/test_faults.py.
            await socket.wait_for(lambda s: s.closed_code is not None, what="close on drain")

        # Every request and every new socket now lands on web-1, none fails.
        for _ in range(10):
            response = await http.get(f"{balancer.url}/readyz")
            assert response.status_code == 200 and response.json()["instance"] == "web-1", response.text
        again = await open_sockets(http, balancer, [users["bob"]] * len(on_web_2))
        assert {s.welcome["instance"] for s in again} == {"web-1"}
        note = await publish(http, balancer, users["alice"], {"user": "bob", "event": "after-failover"})
        live = [s for s in sockets if s not in on_web_2] + again
        for socket in live:
            await socket.wait_for(lambda s: any(m["id"] == note["id"] for m in s.messages), what="message")
        await asyncio.gather(*(s.close() for s in live))
    assert web_1.alive


# --- bin/run -------------------------------------------------------------------------------------


class RunScript:
    """`bin/run` in its own process group, as a terminal runs it; stopped with Ctrl-C (SIGINT)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(ROOT / "bin" / "run")],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """PIDs of the processes honcho started (each in a session of its own)."""
        return [int(pid) for pid in re.findall(r"started \(pid=(\d+)\)", self.output())]

    def interrupt(self, timeout: float = 30) -> int:
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=timeout)

    def kill_leftovers(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        for pid in self.children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def process_gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def port_open(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
        return True
    except httpx.TransportError:
        return False


@pytest.mark.slow
async def test_bin_run_starts_the_deployment_and_ctrl_c_stops_it(transactional_db, namespace, tmp_path):
    lb_port, web_ports = free_port(), [free_port(), free_port()]
    env = clean_environ() | {
        "DJANGO_DEBUG": "1",
        "DATABASE_URL": cluster_support.test_database_url(),
        "DATABASE_CONN_MAX_AGE": "0",
        "RT_NAMESPACE": namespace,
        "RT_LB_PORT": str(lb_port),
        "RT_WEB_PORTS": ",".join(map(str, web_ports)),
        "RT_DEMO_USER": "demo",
        "TMPDIR": str(tmp_path),
    }
    if NGINX is None:
        env["RT_NO_LB"] = "1"
    run = RunScript(env, tmp_path / "bin-run.log")
    entry = f"http://127.0.0.1:{lb_port if NGINX else web_ports[0]}"
    try:
        seen: set[str] = set()

        def both_instances_ready() -> bool:
            if run.process.poll() is not None:
                raise RuntimeError(f"bin/run exited early:\n{run.output()[-3000:]}")
            try:
                response = httpx.get(f"{entry}/readyz", timeout=1)
            except httpx.HTTPError:
                return False
            if response.status_code == 200:
                seen.add(response.json()["instance"])
            return seen == {"web-1", "web-2"} if NGINX else bool(seen)

        await asyncio.to_thread(wait_until, both_instances_ready, 120, 0.1, "bin/run's instances")
        token = re.search(r"demo user 'demo' created: password \S+, API token (\w+)", run.output())
        assert token, run.output()[-3000:]
        headers = {"Authorization": f"Token {token.group(1)}"}

        async with httpx.AsyncClient(timeout=20) as http:
            response = await http.post(f"{entry}/api/v1/ws-tickets/", headers=headers)
            assert response.status_code == 200, response.text
            socket = await LiveSocket.open(
                f"{entry.replace('http', 'ws')}/ws/?ticket={response.json()['ticket']}"
            )
            # A worker of bin/run processes the frame: the echo comes back as a message.
            receipt = await socket.request(
                {"type": "send", "ref": "r1", "event": "echo", "payload": 7}, "receipt"
            )
            assert receipt["type"] == "receipt", receipt
            await socket.wait_for(lambda s: s.messages, timeout=30, what="the echo")
            assert socket.messages[0]["payload"] == {"inbound": receipt["id"], "data": 7}
            await socket.close()

        returncode = await asyncio.to_thread(run.interrupt)
        assert returncode == 130, f"bin/run ended with {returncode}"
        assert "SIGINT received" in run.output()
        for port in [*web_ports, lb_port]:
            assert not port_open(port), f"port {port} still answers after Ctrl-C"
        for pid in run.children():
            assert process_gone(pid), f"process {pid} of bin/run outlived it"
        assert not list(tmp_path.glob("rt-run.*")), "bin/run leaves its temp folder behind"
    finally:
        run.kill_leftovers()
        await delete_namespace(namespace, ["web-1", "web-2"])
