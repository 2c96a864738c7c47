"""`manage.py transportcosts`: what the delivery transport costs per request (docs/performance.md)."""

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from benchmark.transport_costs import measure


class Command(BaseCommand):
    help = (
        "Measure the transport alone against a receiver on loopback: memory per 1,000 requests in "
        "flight, and CPU per request on new and on reused connections, over HTTP and HTTPS."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--in-flight", type=int, default=1000, help="requests held at once for the memory figure")
        parser.add_argument("--requests", type=int, default=3000, help="requests timed for each CPU figure")

    def handle(self, *args: Any, **options: Any) -> None:
        costs = measure(options["in_flight"], options["requests"])
        for scheme, mib in costs.memory_mib_per_1000.items():
            self.stdout.write(f"{scheme:5} memory: {mib:6.1f} MiB per 1,000 requests in flight")
        for case, micros in costs.cpu_us_per_request.items():
            self.stdout.write(f"{case:12} connection: {micros:6.0f} µs of CPU per request (16 in flight)")
