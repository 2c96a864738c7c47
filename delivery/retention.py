"""Retention: attempts are kept for weeks, the rollups that charts read for much longer.

`manage.py prunehistory` (a daily systemd timer in production) deletes in batches of
BATCH rows, each its own short transaction: workers keep writing meanwhile, and a prune cut
short by a restart simply goes on at the next run.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Model, QuerySet
from django.utils import timezone

from delivery.models import AcceptedRollup, DeliveryAttempt, DeliveryRollup, DeliverySeries, RollupFold, Span

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
        ("attempts", DeliveryAttempt.objects.filter(delivered_at__lt=before(retention.attempt_days))),
        ("minute rollups", DeliveryRollup.objects.filter(minute__lt=before(retention.minute_rollup_days))),
        (
            "minute series",
            DeliverySeries.objects.filter(span=Span.MINUTE, start__lt=before(retention.minute_rollup_days)),
        ),
        ("hourly series", DeliverySeries.objects.filter(span=Span.HOUR, start__lt=before(retention.rollup_days))),
        ("accepted counts", AcceptedRollup.objects.filter(minute__lt=before(retention.rollup_days))),
        ("fold marks", RollupFold.objects.filter(folded_at__lt=before(FOLD_MARK_DAYS))),
    ]
    counts: dict[str, int] = {}
    for name, rows in targets:
        counts[name] = rows.count() if dry_run else delete_in_batches(rows)
    return counts


def delete_in_batches(rows: QuerySet[Model], progress: Callable[[int], None] = lambda n: None) -> int:
    deleted = 0
    while True:
        ids = list(rows.order_by().values_list("pk", flat=True)[:BATCH])
        if not ids:
            return deleted
        with transaction.atomic():
            count, _ = rows.model._default_manager.filter(pk__in=ids).delete()
        deleted += count
        progress(deleted)
