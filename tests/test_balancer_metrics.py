"""`/metrics` stays off the public balancer (CONTRACT §3): both nginx configs refuse it, for real.

The upstream here is a stand-in that answers 200 to everything, so a 404 can only come from
nginx itself; the balancer in front of real Daphne instances is tests/test_deployment.py's.
"""

import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from deploy.nginx import render_nginx_conf, write_nginx_conf
from tests.support.cluster import ROOT, free_port, wait_until

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (bin/test installs it)")

REFUSED = ["/metrics", "/metrics?format=prometheus", "/%6Detrics", "//metrics"]


class Upstream(BaseHTTPRequestHandler):
    """Answers 200 with the path it saw: whatever reaches it was let through."""

    def do_GET(self):
        body = f"upstream saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def run_nginx(conf: Path, prefix: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            NGINX,
            "-p",
            str(prefix),
            "-e",
            str(prefix / "logs" / "error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError((prefix / "logs" / "error.log").read_text(errors="replace"))
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return True
        except httpx.TransportError:
            return False

    wait_until(answering, 15, what="nginx answering")
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def assert_metrics_refused_and_the_rest_proxied(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    for path in REFUSED:
        response = httpx.get(base + path, timeout=5)
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert "upstream saw" not in response.text
    for path in ("/", "/api/v1/messages/", "/metrics-dashboard", "/readyz"):
        response = httpx.get(base + path, timeout=5)
        assert response.status_code == 200 and response.text == f"upstream saw {path}", (path, response.text)


def test_both_configs_refuse_metrics_on_the_public_server(tmp_path):
    compose = (ROOT / "deploy" / "nginx.compose.conf").read_text()
    local = render_nginx_conf(8000, [8001], tmp_path)
    for conf in (compose, local):
        assert re.search(r"location\s*=\s*/metrics\s*\{\s*return\s+404;\s*\}", conf), conf


@needs_nginx
def test_the_local_balancer_refuses_metrics_and_proxies_the_rest(tmp_path, upstream):
    port = free_port()
    process = run_nginx(write_nginx_conf(port, [upstream], tmp_path), tmp_path, port)
    try:
        assert_metrics_refused_and_the_rest_proxied(port)
    finally:
        stop(process)


@needs_nginx
def test_the_compose_balancer_refuses_metrics_and_proxies_the_rest(tmp_path, upstream):
    """deploy/nginx.compose.conf as written, but for Docker's DNS name and the port."""
    port = free_port()
    conf = (ROOT / "deploy" / "nginx.compose.conf").read_text()
    local = conf.replace("server web:8000 resolve ", f"server 127.0.0.1:{upstream} ").replace(
        "listen 80;", f"listen 127.0.0.1:{port};"
    )
    assert local.count(f"127.0.0.1:{upstream}") == 1 and f"listen 127.0.0.1:{port};" in local
    (tmp_path / "logs").mkdir()
    (tmp_path / "default.conf").write_text(local)
    temp = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n" for kind in ("proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"{user}pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n"
        f"    access_log {tmp_path}/logs/access.log;\n"
        f"    client_body_temp_path {tmp_path}/client_body;\n{temp}"
        f"    include {tmp_path}/default.conf;\n}}\n"
    )
    process = run_nginx(main, tmp_path, port)
    try:
        assert_metrics_refused_and_the_rest_proxied(port)
        assert httpx.get(f"http://127.0.0.1:{port}/nginx-health", timeout=5).text == "ok\n"
    finally:
        stop(process)
