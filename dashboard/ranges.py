"""Time ranges of the dashboard: which period, cut into which buckets.

Everything is stored and queried in UTC; only day buckets follow the configured TIME_ZONE,
so that a "day" is the reader's day (23 or 25 hours long across a DST change). Buckets of
an hour or less are whole multiples of their length since the Unix epoch, which are also
whole local minutes and hours wherever the zone's offset is a whole number of hours.
"""

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from delivery.models import Span

DAY = 86400
# Bucket lengths (seconds) a custom range may use, finest first; DAY means local days.
BUCKETS = (60, 300, 900, 3600, DAY)
MAX_BUCKETS = 200
MAX_CUSTOM = timedelta(days=92)
# What a custom range may start or end at: rollups count Unix minutes, and a range's bucket
# edges (a day past its end, at most) must stay within what datetime holds.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
# name -> (length, bucket): the ranges the page offers.
PRESETS = {
    "1h": (timedelta(hours=1), 60),
    "24h": (timedelta(hours=24), 900),
    "7d": (timedelta(days=7), 3600),
}


class RangeError(ValueError):
    """A range the dashboard cannot show; the message says why, for the reader."""


@dataclass(frozen=True)
class Window:
    """A range cut into buckets: `edges` are the buckets' starts (UTC), then the range's end."""

    name: str
    bucket: int
    edges: tuple[datetime, ...]

    @property
    def start(self) -> datetime:
        return self.edges[0]

    @property
    def end(self) -> datetime:
        return self.edges[-1]

    def index_of(self, when: datetime) -> int | None:
        """The bucket holding this time, or None outside the window."""
        if not self.start <= when < self.end:
            return None
        return bisect.bisect_right(self.edges, when) - 1

    @property
    def span(self) -> Span:
        """The coarsest rollup that still fits the buckets."""
        return Span.MINUTE if self.bucket < Span.HOUR else Span.HOUR

    def describe(self) -> dict[str, object]:
        local = timezone.get_current_timezone()
        return {
            "name": self.name,
            "start": self.start.astimezone(local).isoformat(),
            "end": self.end.astimezone(local).isoformat(),
            "bucket_seconds": self.bucket,
            "time_zone": str(local),
        }


def window_from(params: Mapping[str, str], now: datetime) -> Window:
    """The window a request asks for: `range` = 1h, 24h (default), 7d, or custom with
    `start` and `end` (ISO 8601; without an offset, in the configured TIME_ZONE)."""
    name = params.get("range") or "24h"
    if name in PRESETS:
        length, bucket = PRESETS[name]
        return preset(name, length, bucket, now)
    if name == "custom":
        # Per-minute rollups are pruned sooner than hourly ones: older times go by the hour.
        minutes_since = now - timedelta(days=settings.MINUTE_ROLLUP_RETENTION_DAYS)
        return custom(_parse(params.get("start"), "start"), _parse(params.get("end"), "end"), minutes_since)
    raise RangeError(f"unknown range {name!r}: use 1h, 24h, 7d or custom")


def preset(name: str, length: timedelta, bucket: int, now: datetime) -> Window:
    """The last `length` up to now, ending with the bucket that holds now."""
    end = _floor(now, bucket) + timedelta(seconds=bucket)
    count = int(length.total_seconds()) // bucket
    return Window(name, bucket, tuple(end - timedelta(seconds=bucket * i) for i in range(count, -1, -1)))


def custom(start: datetime, end: datetime, minutes_since: datetime | None = None) -> Window:
    if end <= start:
        raise RangeError("the range must end after it starts")
    if end - start > MAX_CUSTOM:
        raise RangeError(f"a custom range covers at most {MAX_CUSTOM.days} days")
    seconds = (end - start).total_seconds()
    finest = 3600 if minutes_since is not None and start < minutes_since else 60
    bucket = next(b for b in BUCKETS if b == DAY or (b >= finest and seconds / b <= MAX_BUCKETS))
    if bucket == DAY:
        return Window("custom", DAY, local_midnights(start, end))
    first = _floor(start, bucket)
    count = -(-int((end - first).total_seconds()) // bucket)  # ceiling
    return Window("custom", bucket, tuple(first + timedelta(seconds=bucket * i) for i in range(count + 1)))


def local_midnights(start: datetime, end: datetime) -> tuple[datetime, ...]:
    """Local midnights (as UTC) from the day holding `start` to the first at or after `end`."""
    zone = timezone.get_current_timezone()
    day: date = start.astimezone(zone).date()
    edges = [_midnight(day, zone)]
    while edges[-1] < end:
        day += timedelta(days=1)
        edges.append(_midnight(day, zone))
    return tuple(edges)


def _midnight(day: date, zone: tzinfo) -> datetime:
    return datetime.combine(day, time(), tzinfo=zone).astimezone(UTC)


def _floor(when: datetime, seconds: int) -> datetime:
    stamp = int(when.timestamp()) // seconds * seconds
    return datetime.fromtimestamp(stamp, UTC)


def _parse(text: str | None, name: str) -> datetime:
    try:
        # Django answers None to what does not look like a date, and raises for what looks
        # like one but is none (month 13, an offset of 99 hours); near year 1 or 9999 the
        # move to UTC overflows.
        when = parse_datetime(text or "")
        if when is not None:
            when = (timezone.make_aware(when) if timezone.is_naive(when) else when).astimezone(UTC)
    except (ValueError, OverflowError):
        when = None
    if when is None:
        raise RangeError(f"{name}: give a date and time such as 2026-11-28T09:00")
    if not EARLIEST <= when < LATEST:
        raise RangeError(f"{name}: give a date and time from {EARLIEST.year} to {LATEST.year - 1}")
    return when
