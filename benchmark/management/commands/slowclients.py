"""`manage.py slowclients`: how slow clients hold up a running web process (README, docs/security.md)."""

from argparse import ArgumentParser
from typing import Any
from urllib.parse import urlsplit

from django.core.management.base import BaseCommand

from benchmark.slow_clients import HEALTHZ_TIMEOUT_SECONDS, measure


class Command(BaseCommand):
    help = (
        "Open N clients that send a POST /ingest.php one byte at a time, and time GET /healthz "
        "meanwhile, for each N given."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="the web process (gunicorn, no proxy)")
        parser.add_argument("--clients", type=int, nargs="+", default=[0, 8, 16, 39, 40], help="slow clients")
        parser.add_argument("--seconds", type=float, default=15.0, help="how long /healthz is timed for each N")
        parser.add_argument("--byte-every", type=float, default=0.5, help="seconds between a slow client's bytes")
        parser.add_argument("--body-only", action="store_true", help="send the headers at once, trickle the body")

    def handle(self, *args: Any, **options: Any) -> None:
        url = urlsplit(options["url"])
        host, port = url.hostname or "127.0.0.1", url.port or 80
        self.stdout.write("| slow clients | /healthz answered | not answered | median ms | p95 ms | max ms |")
        self.stdout.write("| --- | --- | --- | --- | --- | --- |")
        for clients in options["clients"]:
            t = measure(host, port, clients, options["seconds"], options["byte_every"], options["body_only"])
            self.stdout.write(
                f"| {clients} | {t.answered} | {t.not_answered} (in {HEALTHZ_TIMEOUT_SECONDS:.0f} s) "
                f"| {t.median_ms:.1f} | {t.p95_ms:.1f} | {t.max_ms:.1f} |"
            )
