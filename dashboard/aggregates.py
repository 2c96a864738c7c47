"""Sums over the rollups, per bucket of a window or per host: what every chart is drawn from.

Nothing here reads attempt rows: a chart's cost follows the number of buckets, outcomes and
status classes (and hosts, for the host table), never the number of attempts. Rows are
grouped into buckets by the database, so that only a few hundred rows come back.
"""

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import F, Func, IntegerField, Max, QuerySet, Sum
from django.db.models.functions import Trunc
from django.utils import timezone

from dashboard.ranges import DAY, Window
from delivery.models import (
    ALL_HOSTS,
    LATENCY_BOUNDS_MS,
    LATENCY_BUCKETS,
    AcceptedRollup,
    DeliveryRollup,
    DeliverySeries,
    Outcome,
    Span,
)

SENT = (Outcome.SUCCESS, Outcome.RETRY, Outcome.FAILED)  # deferred tries were not sent
_SUMS = {
    **{f"sum_{name}": Sum(name) for name in ("attempts", "latency_ms_sum", *LATENCY_BUCKETS)},
    "max_latency_ms_max": Max("latency_ms_max"),
}


class Slot(Func):
    """The bucket (0, 1, ...) a UTC datetime column falls in, counting `seconds` from `origin`
    (Unix time); rows before the origin must be filtered out first."""

    output_field = IntegerField()

    def __init__(self, column: str, origin: int, seconds: int) -> None:
        super().__init__(F(column))
        self.origin, self.seconds = origin, seconds

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        column, params = compiler.compile(self.source_expressions[0])
        return f"((CAST(strftime('%%s', {column}) AS INTEGER) - %s) / %s)", [*params, self.origin, self.seconds]

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        column, params = compiler.compile(self.source_expressions[0])
        return f"FLOOR((EXTRACT(EPOCH FROM {column}) - %s) / %s)::integer", [*params, self.origin, self.seconds]


@dataclass
class Sums:
    """Attempts of one bucket (or host) by outcome and status class, with their latency."""

    outcomes: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)  # sent attempts only
    latency_ms_sum: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_ms_max: float = 0.0

    def add(self, outcome: str, code_class: str, row: dict[str, Any]) -> None:
        attempts = int(row["sum_attempts"] or 0)
        self.outcomes[outcome] += attempts
        if outcome != Outcome.DEFERRED:
            self.classes[code_class] += attempts
        self.latency_ms_sum += float(row["sum_latency_ms_sum"] or 0)
        for index, name in enumerate(LATENCY_BUCKETS):
            self.histogram[index] += int(row[f"sum_{name}"] or 0)
        self.latency_ms_max = max(self.latency_ms_max, float(row["max_latency_ms_max"] or 0))

    def merge(self, other: "Sums") -> None:
        self.outcomes.update(other.outcomes)
        self.classes.update(other.classes)
        self.latency_ms_sum += other.latency_ms_sum
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]
        self.latency_ms_max = max(self.latency_ms_max, other.latency_ms_max)

    @property
    def sent(self) -> int:
        return sum(self.outcomes[outcome] for outcome in SENT)

    def success_rate(self) -> float | None:
        """Percent of sent attempts that succeeded."""
        return round(100 * self.outcomes[Outcome.SUCCESS] / self.sent, 2) if self.sent else None

    def mean_latency(self) -> float | None:
        timed = sum(self.histogram)
        return round(self.latency_ms_sum / timed, 1) if timed else None

    def percentile(self, fraction: float) -> float | None:
        return percentile(self.histogram, fraction, self.latency_ms_max)


def percentile(histogram: list[int], fraction: float, maximum: float) -> float | None:
    """The latency (ms) under which `fraction` of the attempts were answered, interpolated
    linearly inside its histogram bucket, and never above `maximum`, the longest latency
    counted: the bucket that holds it ends there (the last bucket, unbounded, too). The
    estimate is then off by at most the width of its bucket so cut."""
    total = sum(histogram)
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(histogram):
        if count and seen + count >= rank:
            lower = min(LATENCY_BOUNDS_MS[index - 1] if index else 0, maximum)
            upper = min(LATENCY_BOUNDS_MS[index] if index < len(LATENCY_BOUNDS_MS) else maximum, maximum)
            return min(round(lower + (upper - lower) * (rank - seen) / count, 1), maximum)
        seen += count
    return maximum


def per_bucket(window: Window, host: str | None = None) -> list[Sums]:
    """One Sums per bucket of the window, for one host or all."""
    rows: QuerySet[Any]
    if host is None:
        rows, column = DeliverySeries.objects.filter(span=window.span, host=ALL_HOSTS), "start"
    elif window.span == Span.MINUTE:
        rows, column = DeliveryRollup.objects.filter(host=host), "minute"
    else:
        rows, column = DeliverySeries.objects.filter(span=Span.HOUR, host=host), "start"
    buckets = [Sums() for _ in window.edges[:-1]]
    for index, row in _by_bucket(rows, column, window, ["outcome", "code_class"], _SUMS):
        buckets[index].add(row["outcome"], row["code_class"], row)
    return buckets


def accepted_per_bucket(window: Window, unfolded: dict[int, int]) -> list[int]:
    """Postbacks accepted per bucket: the folded minutes from the database, plus `unfolded`
    (minute as Unix time -> count: what ingestion has counted in Redis and not yet folded)."""
    counts = [0] * (len(window.edges) - 1)
    rows = AcceptedRollup.objects.all()
    for index, row in _by_bucket(rows, "minute", window, [], {"postbacks_sum": Sum("postbacks")}):
        counts[index] += int(row["postbacks_sum"] or 0)
    for minute, count in unfolded.items():
        where = window.index_of(datetime.fromtimestamp(minute, UTC))
        if where is not None:
            counts[where] += count
    return counts


def _by_bucket(
    rows: QuerySet[Any], column: str, window: Window, groups: list[str], aggregates: dict[str, Any]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of the window summed per bucket (and per `groups`), with the bucket's index."""
    rows = rows.filter(**{f"{column}__gte": window.start, f"{column}__lt": window.end})
    if window.bucket == DAY:
        # Local days: the database truncates in the configured zone, DST included.
        day = Trunc(column, "day", tzinfo=timezone.get_current_timezone())
        index_of = {edge: index for index, edge in enumerate(window.edges[:-1])}
        for row in rows.annotate(slot=day).values("slot", *groups).annotate(**aggregates).order_by():
            yield index_of[row["slot"]], row
        return
    slot = Slot(column, int(window.start.timestamp()), window.bucket)
    for row in rows.annotate(slot=slot).values("slot", *groups).annotate(**aggregates).order_by():
        yield int(row["slot"]), row


def per_host(window: Window) -> dict[str, Sums]:
    """Sums per destination host over the whole window: whole hours from the hourly series,
    the minutes before the first and after the last whole hour from the minute rollups."""
    hosts: dict[str, Sums] = {}
    for rows, column, start, end in _host_sources(window):
        found = rows.filter(**{f"{column}__gte": start, f"{column}__lt": end})
        for row in found.values("host", "outcome", "code_class").annotate(**_SUMS).order_by():
            hosts.setdefault(row["host"], Sums()).add(row["outcome"], row["code_class"], row)
    return hosts


def _host_sources(window: Window) -> Iterable[tuple[QuerySet[Any], str, datetime, datetime]]:
    hourly = DeliverySeries.objects.filter(span=Span.HOUR).exclude(host=ALL_HOSTS)
    minutes = DeliveryRollup.objects.all()
    first_hour = _ceil_hour(window.start)
    last_hour = window.end.replace(minute=0, second=0, microsecond=0)
    if first_hour >= last_hour:
        return [(minutes, "minute", window.start, window.end)]
    return [
        (minutes, "minute", window.start, first_hour),
        (hourly, "start", first_hour, last_hour),
        (minutes, "minute", last_hour, window.end),
    ]


def _ceil_hour(when: datetime) -> datetime:
    floor = when.replace(minute=0, second=0, microsecond=0)
    return floor if floor == when else floor + timedelta(hours=1)


def total(buckets: Iterable[Sums]) -> Sums:
    whole = Sums()
    for bucket in buckets:
        whole.merge(bucket)
    return whole
