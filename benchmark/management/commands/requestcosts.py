"""`manage.py requestcosts`: what the largest requests ingestion accepts cost (docs/security.md)."""

from argparse import ArgumentParser
from collections.abc import Iterable
from typing import Any

from django.core.management.base import BaseCommand

from benchmark.request_costs import CASES, STORAGE_CASES, RenderingCost, StorageCost, rendering_cost, storage_cost
from delivery import drain


class Command(BaseCommand):
    help = (
        "Make the tries of requests at ingestion's limits as a worker does, a slice at a time (CPU for "
        "the whole request, and for the longest slice); with --storage, also record one try of each "
        "postback in the database, in a transaction rolled back (run it on a scratch database), and "
        "say what the database and the workers' log grow by."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--storage", action="store_true", help="also measure storage (writes, then rolls back)")

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(f"Making tries, slices of {drain.RENDER_SLICE_SECONDS * 1000:.0f} ms")
        columns = ["request", "body KiB", "rendered MiB", "CPU s", "longest slice, CPU ms"]
        self.write_table(columns, (rendering_row(rendering_cost(case)) for case in CASES))
        if options["storage"]:
            self.stdout.write("\nStoring one try of each postback")
            columns = ["request", "rendered MiB", "database MiB", "B/row", "log MiB", "B/line", "insert s"]
            self.write_table(columns, (storage_row(storage_cost(case)) for case in STORAGE_CASES))

    def write_table(self, columns: list[str], rows: Iterable[list[str]]) -> None:
        """A Markdown table, each row written as soon as it is measured."""
        self.stdout.write("| " + " | ".join(columns) + " |")
        self.stdout.write("|" + " --- |" * len(columns))
        for row in rows:
            self.stdout.write("| " + " | ".join(row) + " |")


def rendering_row(cost: RenderingCost) -> list[str]:
    rendered = cost.rendered_bytes / 2**20
    return [cost.case, f"{cost.body_bytes / 1024:,.0f}", f"{rendered:.1f}", f"{cost.cpu_seconds:.2f}",
            f"{cost.longest_slice_ms:.1f}"]  # fmt: skip


def storage_row(cost: StorageCost) -> list[str]:
    per_row, per_line = cost.database_bytes / cost.postbacks, cost.log_bytes / cost.postbacks
    return [cost.case, f"{cost.rendered_bytes / 2**20:.1f}", f"{cost.database_bytes / 2**20:.1f}", f"{per_row:,.0f}",
            f"{cost.log_bytes / 2**20:.1f}", f"{per_line:,.0f}", f"{cost.insert_seconds:.1f}"]  # fmt: skip
