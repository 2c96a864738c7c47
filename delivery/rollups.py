"""Per-minute rollups: attempts by host, outcome and status class, and postbacks accepted.

Charts over millions of attempts read these, not the attempts: DeliveryRollup per minute and
host, and DeliverySeries, the same sums per minute for all hosts together and per hour. They
stay exact:
- attempt rollups are added in the same transaction as the attempt rows, from the rows the
  INSERT really wrote (a try recorded again after a crash is not counted again);
- ingestion counts accepted postbacks in Redis, in the script that appends to the inbox, and
  `fold_accepted` moves whole minutes into the database: the counts move to a staging key
  named by a token, and the database keeps the token of every fold it took, so a fold that is
  retried (or done by two processes at once) is counted once.
"""

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from django.db import IntegrityError, connection, transaction

from delivery.models import (
    ALL_HOSTS,
    LATENCY_BOUNDS_MS,
    LATENCY_BUCKETS,
    AcceptedRollup,
    DeliveryRollup,
    DeliverySeries,
    RollupFold,
    Span,
)
from postbackproject import keys, scripts, shards
from postbackproject.queue import get_connection


class Recorded(Protocol):
    """A try as recorded: a `delivery.recording.Record`, or a DeliveryAttempt row (the
    migration that filled rollups for rows recorded before them)."""

    postback_id: str
    attempt: int
    host: str
    delivered_at: datetime
    response_code: int | None
    response_time_ms: float | None
    outcome: str


# How often a process folds accepted counts (seconds); any process may, at any time.
FOLD_EVERY_SECONDS = 10.0

# Move the accepted counts of every minute before this one (by Redis's clock, which ingestion
# counts minutes on) into the staging hash KEYS[2].
_TAKE = """
local live, staging, before = KEYS[1], KEYS[2], math.floor(now_ms() / 60000) * 60
local counts = redis.call('HGETALL', live)
for i = 1, #counts, 2 do
  if tonumber(counts[i]) < before then
    redis.call('HINCRBY', staging, counts[i], counts[i + 1])
    redis.call('HDEL', live, counts[i])
  end
end
return redis.call('HGETALL', staging)
"""


def code_class(status: int | None) -> str:
    return "none" if status is None else f"{status // 100}xx"


def minute_of(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(second=0, microsecond=0)


@dataclass
class Tally:
    """The sums of one rollup row: attempts, latency, its histogram, and its maximum."""

    attempts: int = 0
    latency_ms_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_ms_max: float = 0.0

    def add(self, latency_ms: float | None) -> None:
        self.attempts += 1
        if latency_ms is None:
            return  # deferred: nothing was sent
        self.latency_ms_sum += latency_ms
        self.buckets[bucket_index(latency_ms)] += 1
        self.latency_ms_max = max(self.latency_ms_max, latency_ms)

    def merge(self, other: "Tally") -> None:
        self.attempts += other.attempts
        self.latency_ms_sum += other.latency_ms_sum
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.latency_ms_max = max(self.latency_ms_max, other.latency_ms_max)

    def columns(self) -> list[Any]:
        """The values of _SUMS, then of _MAXIMA."""
        return [self.attempts, self.latency_ms_sum, *self.buckets, self.latency_ms_max]


# (minute, host, outcome, code class): the key of a DeliveryRollup row.
MinuteKey = tuple[datetime, str, str, str]
_SUMS = ["attempts", "latency_ms_sum", *LATENCY_BUCKETS]
_MAXIMA = ["latency_ms_max"]


def bucket_index(latency_ms: float) -> int:
    return next((i for i, bound in enumerate(LATENCY_BOUNDS_MS) if latency_ms <= bound), len(LATENCY_BOUNDS_MS))


def tally(rows: Iterable[Recorded]) -> dict[MinuteKey, Tally]:
    tallies: dict[MinuteKey, Tally] = defaultdict(Tally)
    for row in rows:
        key = (minute_of(row.delivered_at), row.host, str(row.outcome), code_class(row.response_code))
        tallies[key].add(row.response_time_ms)
    return tallies


def add_to_rollups(rows: Iterable[Recorded]) -> None:
    """Add attempt rows just inserted to their rollups: minute per host, and the coarser series."""
    add_tallies(tally(rows))


def add_tallies(tallies: dict[MinuteKey, Tally]) -> None:
    add_to_minute_rollups(tallies)
    add_to_series(tallies)


def add_to_series(tallies: dict[MinuteKey, Tally]) -> None:
    """The minute tallies, added to the all-hosts minute series and the hourly series."""
    series: dict[tuple[int, str, datetime, str, str], Tally] = defaultdict(Tally)
    for (minute, host, outcome, klass), counts in tallies.items():
        hour = minute.replace(minute=0)
        for key in (
            (Span.MINUTE, ALL_HOSTS, minute, outcome, klass),
            (Span.HOUR, host, hour, outcome, klass),
            (Span.HOUR, ALL_HOSTS, hour, outcome, klass),
        ):
            series[key].merge(counts)
    adapt = connection.ops.adapt_datetimefield_value
    values = [[int(span), host, adapt(start), o, c, *t.columns()] for (span, host, start, o, c), t in series.items()]
    groups = ["span", "host", "start", "outcome", "code_class"]
    upsert_adding(DeliverySeries._meta.db_table, groups, _SUMS, values, maxima=_MAXIMA)


def add_to_minute_rollups(tallies: dict[MinuteKey, Tally]) -> None:
    adapt = connection.ops.adapt_datetimefield_value
    values = [[adapt(minute), host, o, c, *t.columns()] for (minute, host, o, c), t in tallies.items()]
    groups = ["minute", "host", "outcome", "code_class"]
    upsert_adding(DeliveryRollup._meta.db_table, groups, _SUMS, values, maxima=_MAXIMA)


def upsert_adding(
    table: str,
    groups: list[str],
    sums: list[str],
    values: Sequence[Sequence[Any]],
    chunk: int = 1000,
    maxima: Sequence[str] = (),
) -> None:
    """INSERT rows (values: groups, sums, then maxima); where a row of the same group exists,
    add the sums to it instead, and keep the larger of each maximum.

    Rows go in sorted by their group: every writer then locks shared rows (the all-hosts
    series above all) in the same order, so concurrent workers wait for each other on
    PostgreSQL instead of deadlocking.
    """
    if not values:
        return
    ordered = sorted(values, key=lambda row: tuple(row[: len(groups)]))
    quote = connection.ops.quote_name
    columns = [*groups, *sums, *maxima]
    row_sql = "(" + ", ".join(["%s"] * len(columns)) + ")"
    greatest = "MAX" if connection.vendor == "sqlite" else "GREATEST"  # SQLite's MAX(a, b) is scalar
    additions = ", ".join(
        [f"{quote(c)} = {quote(table)}.{quote(c)} + excluded.{quote(c)}" for c in sums]
        + [f"{quote(c)} = {greatest}({quote(table)}.{quote(c)}, excluded.{quote(c)})" for c in maxima]
    )
    with connection.cursor() as cursor:
        for start in range(0, len(ordered), chunk):
            part = ordered[start : start + chunk]
            cursor.execute(
                f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in columns)}) VALUES "
                f"{', '.join([row_sql] * len(part))} "
                f"ON CONFLICT ({', '.join(quote(c) for c in groups)}) DO UPDATE SET {additions}",
                [value for row in part for value in row],
            )


# --- accepted postbacks ----------------------------------------------------------------------


def add_accepted(counts: dict[datetime, int]) -> None:
    """Add postbacks accepted per minute (UTC) to AcceptedRollup."""
    adapt = connection.ops.adapt_datetimefield_value
    values = [[adapt(minute), count] for minute, count in counts.items() if count]
    upsert_adding(AcceptedRollup._meta.db_table, ["minute"], ["postbacks"], values)


_last_fold = 0.0


def fold_accepted_now_and_then() -> None:
    """fold_accepted, at most every FOLD_EVERY_SECONDS in this process (called from loops)."""
    global _last_fold
    if time.monotonic() - _last_fold >= FOLD_EVERY_SECONDS:
        _last_fold = time.monotonic()
        fold_accepted()


def fold_accepted() -> int:
    """Move the accepted counts of past minutes from Redis into AcceptedRollup; returns how
    many postbacks were folded. Also finishes folds that a crashed process left staged."""
    redis = get_connection()
    folded = 0
    with shards.unless_a_master_is_down("looking for folds left by a crash"):  # asks every master
        staging = keys.ACCEPTED_FOLDING_PREFIX + ":*"  # every shard's: folds a crash left
        folded += sum(_fold_staged(key.decode()) for key in redis.scan_iter(staging, count=100))
    for shard in shards.listed():
        with shards.unless_a_master_is_down(f"folding inbox shard {shard.id}'s counts"):
            folding = shard.folding(uuid.uuid4().hex)
            if scripts.run(_TAKE, [shard.accepted, folding], [], client=redis):
                folded += _fold_staged(folding)
    return folded


def _fold_staged(key: str) -> int:
    """Add one staging hash to the database once (its token marks it), then drop it."""
    redis = get_connection()
    counts = {int(minute): int(count) for minute, count in redis.hgetall(key).items()}
    token = key.rpartition(":")[2]
    try:
        with transaction.atomic():
            RollupFold.objects.create(token=token)  # a second fold of the same token fails here
            add_accepted({datetime.fromtimestamp(minute, UTC): count for minute, count in counts.items()})
    except IntegrityError:
        counts = {}  # folded already (by a process that died before dropping the key)
    redis.delete(key)
    return sum(counts.values())
