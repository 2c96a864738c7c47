"""`manage.py prunehistory`: delete attempts and rollups older than their retention (run daily
by postback-prune.timer in production). On PostgreSQL it also makes the attempt log's day
partitions ahead, and drops the days wholly past retention (`delivery.retention`)."""

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from delivery import partitions
from delivery.retention import Retention, prune


class Command(BaseCommand):
    help = (
        "Delete attempts older than ATTEMPT_RETENTION_DAYS, per-minute rollups older than "
        "MINUTE_ROLLUP_RETENTION_DAYS, hourly rollups and accepted counts older than ROLLUP_RETENTION_DAYS."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        configured = Retention.configured()
        parser.add_argument("--attempt-days", type=int, default=configured.attempt_days)
        parser.add_argument("--minute-rollup-days", type=int, default=configured.minute_rollup_days)
        parser.add_argument("--rollup-days", type=int, default=configured.rollup_days)
        parser.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        retention = Retention(options["attempt_days"], options["minute_rollup_days"], options["rollup_days"])
        if min(retention.attempt_days, retention.minute_rollup_days, retention.rollup_days) < 1:
            raise CommandError("retention periods are at least 1 day")
        if retention.rollup_days < retention.minute_rollup_days:
            raise CommandError("hourly rollups must be kept at least as long as the per-minute ones")
        dry_run = options["dry_run"]
        self.say_partitions(retention, dry_run)
        counts = prune(retention, dry_run=dry_run)
        verb = "would delete" if dry_run else "deleted"
        self.stdout.write(", ".join(f"{verb} {count} {name}" for name, count in counts.items()))

    def say_partitions(self, retention: Retention, dry_run: bool) -> None:
        """The day partitions this run drops (or would), and those it made ahead."""
        if not partitions.partitioned():
            return
        due = partitions.past(timezone.now() - timedelta(days=retention.attempt_days))
        verb = "would drop" if dry_run else "dropping"
        listed = ", ".join(f"{partition.name} ({partitions.rows_in(partition):,} rows)" for partition in due)
        self.stdout.write(f"{verb} {len(due)} day partitions of the attempt log{': ' if due else ''}{listed}")
        if not dry_run:
            made = partitions.make_ahead()
            self.stdout.write(f"made {len(made)} day partitions ahead{': ' if made else ''}{', '.join(map(str, made))}")
