"""`manage.py seedhistory --attempts N`: realistic delivery history, for trying and measuring
the dashboard. Adds to what is there; never run it against production data."""

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from delivery.seeding import seed


def parse_end(text: str) -> datetime:
    when = parse_datetime(text)
    if when is None or when.tzinfo is None:
        raise CommandError(f"--end is ISO 8601 with its zone, e.g. 2026-11-28T09:00Z; got {text!r}")
    return when


class Command(BaseCommand):
    help = (
        "Write N realistic attempt rows (with their rollups and accepted counts) over the last "
        "--days days: Zipf-like traffic over --hosts hosts, some flaky, some failing, some down for hours."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--attempts", type=int, required=True, help="attempt rows to write")
        parser.add_argument("--days", type=float, default=14, help="spread over this many days (default 14)")
        parser.add_argument("--hosts", type=int, default=50, help="destination hosts (default 50)")
        parser.add_argument("--end", type=parse_end, help="the history ends here (default: now)")
        parser.add_argument("--seed", type=int, help="random seed, for the same history again")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["attempts"] < 1 or options["hosts"] < 1 or options["days"] <= 0:
            raise CommandError("--attempts, --hosts and --days must be positive")
        started = timezone.now()

        def progress(written: int) -> None:
            if options["verbosity"] >= 2:
                self.stdout.write(f"{written} rows")

        written = seed(
            options["attempts"],
            options["days"],
            options["hosts"],
            options["end"] or timezone.now(),
            options["seed"],
            progress,
        )
        seconds = (timezone.now() - started).total_seconds()
        self.stdout.write(f"{written} attempt rows written in {seconds:.1f} s ({written / seconds:,.0f} rows/s)")
