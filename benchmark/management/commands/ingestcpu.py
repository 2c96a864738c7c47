"""`manage.py ingestcpu`: CPU per request of the web application in-process (docs/performance.md)."""

from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from benchmark.ingest_cpu import measure, scratch_redis
from postbackproject.wsgi import application, django_application


class Command(BaseCommand):
    help = (
        "Call the WSGI application in-process (no socket) for /healthz and for an ingest of the "
        "sample, against a Redis of its own, and print the CPU per request (best of the rounds)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--calls", type=int, default=3000, help="requests timed in each round")
        parser.add_argument("--rounds", type=int, default=5, help="rounds; the best one counts")

    def handle(self, *args: Any, **options: Any) -> None:
        with scratch_redis() as url:
            # Before the process's Redis client is first built (postbackproject.queue, lazily).
            settings.REDIS_URL = url
            costs = measure(application, django_application, options["calls"], options["rounds"])
        ratio = costs["/healthz"] / costs["/ingest.php"]
        for path, micros in costs.items():
            self.stdout.write(f"{path:20} {micros:6.1f} µs of CPU per request")
        self.stdout.write(f"ingest / healthz in requests per CPU-second: {ratio:.2f}")
