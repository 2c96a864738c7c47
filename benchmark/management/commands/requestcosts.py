"""`manage.py requestcosts`: what the largest requests ingestion accepts cost a worker
(docs/security.md)."""

from typing import Any

from django.core.management.base import BaseCommand

from benchmark.request_costs import CASES, rendering_cost
from delivery import drain


class Command(BaseCommand):
    help = (
        "Make the tries of requests at ingestion's limits as a worker does, a slice at a time: CPU "
        "for the whole request, and for the longest slice."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(f"slices of {drain.RENDER_SLICE_SECONDS * 1000:.0f} ms")
        self.stdout.write("| request | body KiB | rendered MiB | CPU s | longest slice, CPU ms |")
        self.stdout.write("| --- | --- | --- | --- | --- |")
        for case in CASES:
            cost = rendering_cost(case)
            self.stdout.write(
                f"| {cost.case} | {cost.body_bytes / 1024:,.0f} | {cost.rendered_bytes / 2**20:.1f} "
                f"| {cost.cpu_seconds:.2f} | {cost.longest_slice_ms:.1f} |"
            )
