"""`python manage.py run_workers [--concurrency N] [--metrics-port P]`: one worker process of the
inbound queue."""

import logging

import uvloop
from django.core.management.base import BaseCommand, CommandError
from prometheus_client import start_http_server

from consumers_app.worker import InboundWorker
from realtime_project.gc_tuning import tune_garbage_collector

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Consume <ns>.inbound as a competing consumer; run as many of these processes as you like."

    def add_arguments(self, parser):
        parser.add_argument(
            "--concurrency",
            type=int,
            default=4,
            help="Frames this process handles at once (each in its own thread). Default 4.",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=0,
            help="Serve this worker's Prometheus metrics (frames processed, failed and dead, ...) "
            "over HTTP on this port, at /metrics. 0 (the default): none.",
        )
        parser.add_argument(
            "--metrics-host",
            default="127.0.0.1",
            help="Address the metrics port listens on. Default 127.0.0.1; 0.0.0.0 in a container "
            "whose metrics another one scrapes. Never expose it publicly: it has no credentials.",
        )

    def handle(self, *args, concurrency: int, metrics_port: int, metrics_host: str, **options):
        if concurrency < 1 or concurrency > 256:
            raise CommandError("--concurrency must be between 1 and 256")
        if metrics_port < 0 or metrics_port > 65535:
            raise CommandError("--metrics-port must be between 0 (none) and 65535")
        if metrics_port:
            serve_metrics(metrics_host, metrics_port)
        tune_garbage_collector()
        # uvloop's event loop costs less per broker message than asyncio's own.
        uvloop.run(self._run(concurrency))

    async def _run(self, concurrency: int) -> None:
        worker = InboundWorker(concurrency=concurrency)
        worker.install_signal_handlers()
        await worker.run()


def serve_metrics(host: str, port: int) -> None:
    """prometheus-client's own HTTP server, in a daemon thread: this process's registry (every
    `rt_*` metric of notifications.metrics, labelled with this worker's RT_INSTANCE_ID)."""
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise CommandError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    logger.info("metrics on http://%s:%d/metrics", host, port)
