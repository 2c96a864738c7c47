"""Retention: attempts are kept for weeks, the rollups that charts read for much longer.

`manage.py prunehistory` (a daily systemd timer in production) deletes in batches of
BATCH rows, each its own short transaction: workers keep writing meanwhile, and a prune cut
short by a restart simply goes on at the next run.

On PostgreSQL the attempt log is partitioned by UTC day (`delivery.partitions`): a day wholly
past retention is dropped whole, and the day the cutoff falls in is kept whole until the next
run, so attempts are kept between ATTEMPT_RETENTION_DAYS and one day more. Only rows that sit
in the DEFAULT partition are deleted row by row. The same run makes the partitions ahead.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Model, QuerySet
from django.utils import timezone

from delivery import partitions
from delivery.models import RECORDED_WITHIN, AcceptedRollup, DeliveryRollup, DeliverySeries, RollupFold, Span

BATCH = 10_000
# A fold's mark guards against counting a staged fold twice; a staged fold is finished within
# seconds, so a week is plenty.
FOLD_MARK_DAYS = 7


@dataclass(frozen=True)
class Retention:
    attempt_days: int
    minute_rollup_days: int
    rollup_days: int

    @classmethod
    def configured(cls) -> "Retention":
        return cls(
            settings.ATTEMPT_RETENTION_DAYS, settings.MINUTE_ROLLUP_RETENTION_DAYS, settings.ROLLUP_RETENTION_DAYS
        )


def prune(retention: Retention, now: datetime | None = None, dry_run: bool = False) -> dict[str, int]:
    """Delete what is older than its retention; returns rows deleted (or due, when dry) per kind."""
    now = now or timezone.now()

    def before(days: int) -> datetime:
        return now - timedelta(days=days)

    targets: list[tuple[str, QuerySet[Model]]] = [
        ("minute rollups", DeliveryRollup.objects.filter(minute__lt=before(retention.minute_rollup_days))),
        (
            "minute series",
            DeliverySeries.objects.filter(span=Span.MINUTE, start__lt=before(retention.minute_rollup_days)),
        ),
        ("hourly series", DeliverySeries.objects.filter(span=Span.HOUR, start__lt=before(retention.rollup_days))),
        ("accepted counts", AcceptedRollup.objects.filter(minute__lt=before(retention.rollup_days))),
        ("fold marks", RollupFold.objects.filter(folded_at__lt=before(FOLD_MARK_DAYS))),
    ]
    attempts_before = before(retention.attempt_days)
    counts = {
        "attempts": prune_attempts(attempts_before, dry_run),
        # Kept longer: every attempt still kept finds its request within RECORDED_WITHIN.
        "requests": prune_requests(attempts_before - RECORDED_WITHIN, dry_run),
    }
    for name, rows in targets:
        counts[name] = rows.count() if dry_run else delete_in_batches(rows)
    return counts


def prune_attempts(cutoff: datetime, dry_run: bool = False) -> int:
    """Attempts that started before `cutoff` deleted (or counted, when dry); returns the rows."""
    return prune_log(partitions.ATTEMPTS, cutoff, dry_run)


def prune_requests(cutoff: datetime, dry_run: bool = False) -> int:
    """Requests first sent before `cutoff` deleted (or counted, when dry); returns the rows."""
    return prune_log(partitions.REQUESTS, cutoff, dry_run)


def prune_log(log: partitions.Log, cutoff: datetime, dry_run: bool) -> int:
    """The log's rows from before `cutoff` deleted (or counted, when dry): on PostgreSQL the
    day partitions wholly before it dropped, and rows of those days in the DEFAULT partition
    deleted. Returns the rows."""
    older = log.model._default_manager.filter(**{f"{log.column}__lt": cutoff})
    if not partitions.partitioned():
        return older.count() if dry_run else delete_in_batches(older)
    due = partitions.past(cutoff, log)
    counted = sum(partitions.rows_in(partition) for partition in due)
    if not dry_run:
        for partition in due:
            partitions.drop(partition)
    kept_from = partitions.bounds(partitions.day_of(cutoff))[0]
    if dry_run:
        return counted + partitions.rows_in_default(kept_from, log)
    return counted + delete_in_batches(log.model._default_manager.filter(**{f"{log.column}__lt": kept_from}))


def delete_in_batches(rows: QuerySet[Model], progress: Callable[[int], None] = lambda n: None) -> int:
    deleted = 0
    while True:
        ids = list(rows.order_by().values_list("pk", flat=True)[:BATCH])
        if not ids:
            return deleted
        with transaction.atomic():
            # The query's own filter stays: on a partitioned log it keeps the delete to the
            # partitions it can touch.
            count, _ = rows.filter(pk__in=ids).delete()
        deleted += count
        progress(deleted)
