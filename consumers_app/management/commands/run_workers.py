"""`python manage.py run_workers [--concurrency N]`: one worker process of the inbound queue."""

import uvloop
from django.core.management.base import BaseCommand, CommandError

from consumers_app.worker import InboundWorker
from realtime_project.gc_tuning import tune_garbage_collector


class Command(BaseCommand):
    help = "Consume <ns>.inbound as a competing consumer; run as many of these processes as you like."

    def add_arguments(self, parser):
        parser.add_argument(
            "--concurrency",
            type=int,
            default=4,
            help="Frames this process handles at once (each in its own thread). Default 4.",
        )

    def handle(self, *args, concurrency: int, **options):
        if concurrency < 1 or concurrency > 256:
            raise CommandError("--concurrency must be between 1 and 256")
        tune_garbage_collector()
        # uvloop's event loop costs less per broker message than asyncio's own.
        uvloop.run(self._run(concurrency))

    async def _run(self, concurrency: int) -> None:
        worker = InboundWorker(concurrency=concurrency)
        worker.install_signal_handlers()
        await worker.run()
