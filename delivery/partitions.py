"""The attempt log on PostgreSQL: one partition per UTC day, made ahead, dropped whole.

Retention on one big table deletes rows one by one: a day of a busy service is millions of
deletes, the vacuum after them, and indexes that stay bloated. Partitioned by the day an
attempt started (`delivered_at`), a day past retention goes with one DROP TABLE.

- Partitions are made ahead (today and the next AHEAD_DAYS) by every worker as it starts and
  by the daily `prunehistory`, and on demand before a worker writes rows of a day that has none
  (a clock that jumped, a long outage): made, never refused.
- A DEFAULT partition takes whatever finds no day of its own (a row written while its day's
  partition could not be made, rows written through the ORM for any date): nothing is lost.
  Making a day's partition later moves that day's rows out of it.
- Creating and dropping a partition locks the whole log for a moment; both wait at most
  LOCK_TIMEOUT for that lock and give up rather than stall the workers (rows then go to the
  DEFAULT partition, and the drop is tried again at the next prune).

SQLite, the embedded default, keeps one table: every function here is a no-op there.
"""

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from delivery.models import DeliveryAttempt

logger = logging.getLogger(__name__)

PARENT = DeliveryAttempt._meta.db_table
DEFAULT = f"{PARENT}_default"
# Days of partitions made ahead of today: a worker writing just after midnight never waits for
# one, and a daily timer that missed a few runs still finds them made.
AHEAD_DAYS = 3
LOCK_TIMEOUT = "5s"
_NAME = re.compile(rf"^{re.escape(PARENT)}_p(\d{{8}})$")

# Days whose partition this process has seen or made; rows of these days need no query.
_known: set[date] = set()


@dataclass(frozen=True)
class DayPartition:
    day: date
    name: str


def partitioned() -> bool:
    """Whether the attempt log is partitioned here (PostgreSQL) or one table (SQLite)."""
    return connection.vendor == "postgresql"


def day_of(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def bounds(day: date) -> tuple[datetime, datetime]:
    """The partition's range: from the day's UTC midnight up to (not including) the next."""
    start = datetime.combine(day, time(), UTC)
    return start, start + timedelta(days=1)


def name_of(day: date) -> str:
    return f"{PARENT}_p{day:%Y%m%d}"


def existing() -> list[DayPartition]:
    """The day partitions of the log, oldest first (the DEFAULT partition is not one)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT child.relname FROM pg_inherits JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "WHERE pg_inherits.inhparent = %s::regclass",
            [PARENT],
        )
        names = [row[0] for row in cursor.fetchall()]
    found = [
        DayPartition(datetime.strptime(match[1], "%Y%m%d").date(), name)
        for name in names
        if (match := _NAME.match(name))
    ]
    return sorted(found, key=lambda partition: partition.day)


def make_room_for(moments: Iterable[datetime]) -> None:
    """Every day these rows fall on has its partition, made now if it was missing. Never
    raises for a partition it could not make: the rows then go to the DEFAULT partition."""
    if not partitioned():
        return
    days = {day_of(moment) for moment in moments} - _known
    if days:
        ensure(days)


def make_ahead(today: date | None = None) -> list[date]:
    """Partitions for yesterday, today and AHEAD_DAYS ahead; returns the days made now."""
    if not partitioned():
        return []
    today = today or day_of(timezone.now())
    return ensure(today + timedelta(days=offset) for offset in range(-1, AHEAD_DAYS + 1))


def make_ahead_if_possible() -> None:
    """make_ahead, logging instead of raising while the database is away (a worker starting
    during an outage goes on: its writes make their partitions when they come)."""
    try:
        make_ahead()
    except DatabaseError:
        logger.warning("could not make the attempt log's partitions ahead; writes will make them", exc_info=True)


def ensure(days: Iterable[date]) -> list[date]:
    """Make the partitions these days lack; returns the days made (those that could not be are
    logged, and their rows go to the DEFAULT partition meanwhile)."""
    wanted = set(days)
    present = {partition.day for partition in existing()}
    _known.update(present & wanted)
    made = []
    for day in sorted(wanted - present):
        try:
            _create(day)
        except DatabaseError:
            logger.warning(
                "could not make the attempt log's partition for %s; its rows go to %s", day, DEFAULT, exc_info=True
            )
            continue
        _known.add(day)
        made.append(day)
    return made


def _create(day: date) -> None:
    """The day's partition; rows of that day already in the DEFAULT partition are moved into
    it (PostgreSQL refuses to make a partition whose rows sit in the DEFAULT one)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cursor.execute(f"SELECT 1 FROM {DEFAULT} WHERE delivered_at >= %s AND delivered_at < %s LIMIT 1", bounds(day))
        if cursor.fetchone() is None:
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {name_of(day)} PARTITION OF {PARENT} {_range(day)}")
        else:
            _create_from_default(cursor, day)


def _create_from_default(cursor: object, day: date) -> None:
    """Move the day's rows out of the DEFAULT partition into a new table, then attach that
    table as the day's partition (its CHECK lets the attach skip a scan)."""
    name, (start, end) = name_of(day), bounds(day)
    columns = ", ".join(connection.ops.quote_name(field.column) for field in DeliveryAttempt._meta.concrete_fields)
    statements = [
        (f"CREATE TABLE {name} (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)", []),
        (
            f"WITH moved AS (DELETE FROM {DEFAULT} WHERE delivered_at >= %s AND delivered_at < %s "
            f"RETURNING {columns}) INSERT INTO {name} ({columns}) SELECT {columns} FROM moved",
            [start, end],
        ),
        (f"ALTER TABLE {name} ADD CONSTRAINT {name}_day CHECK (delivered_at {_range_check(start, end)})", []),
        (f"ALTER TABLE {PARENT} ATTACH PARTITION {name} {_range(day)}", []),
        (f"ALTER TABLE {name} DROP CONSTRAINT {name}_day", []),
    ]
    for sql, params in statements:
        cursor.execute(sql, params)  # type: ignore[attr-defined]


def _range(day: date) -> str:
    """The partition bound clause; DDL takes no parameters, and these literals come from a date."""
    start, end = bounds(day)
    return f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"


def _range_check(start: datetime, end: datetime) -> str:
    return f">= '{start.isoformat()}' AND delivered_at < '{end.isoformat()}'"


def past(cutoff: datetime) -> list[DayPartition]:
    """The day partitions that hold nothing at or after `cutoff`: whole days past it."""
    return [partition for partition in existing() if bounds(partition.day)[1] <= cutoff]


def rows_in(partition: DayPartition) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {partition.name}")
        return int(cursor.fetchone()[0])


def rows_in_default(before: datetime) -> int:
    """Rows in the DEFAULT partition that started before `before`."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {DEFAULT} WHERE delivered_at < %s", [before])
        return int(cursor.fetchone()[0])


def drop(partition: DayPartition) -> None:
    """Drop a day's partition and its rows; waits at most LOCK_TIMEOUT for the log's lock."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cursor.execute(f"DROP TABLE {partition.name}")
    _known.discard(partition.day)


def forget_known() -> None:
    """Forget which partitions this process has seen (tests that drop or make them)."""
    _known.clear()
