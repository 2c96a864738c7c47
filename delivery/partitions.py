"""The attempt log on PostgreSQL: one partition per UTC day, made ahead, dropped whole.

Retention on one big table deletes rows one by one: a day of a busy service is millions of
deletes, the vacuum after them, and indexes that stay bloated. Partitioned by the day an
attempt started (`delivered_at`), a day past retention goes with one DROP TABLE. The
postbacks' requests (`PostbackRequest`) are partitioned the same way, by `first_at`.

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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from typing import Any

from django.db import DatabaseError, connection, models, transaction
from django.utils import timezone

from delivery.models import DeliveryAttempt, PostbackRequest

logger = logging.getLogger(__name__)

# Days of partitions made ahead of today: a worker writing just after midnight never waits for
# one, and a daily timer that missed a few runs still finds them made.
AHEAD_DAYS = 3
LOCK_TIMEOUT = "5s"


@dataclass(frozen=True)
class Log:
    """A table partitioned by UTC day of one of its columns."""

    model: type[models.Model]
    column: str

    @property
    def table(self) -> str:
        return self.model._meta.db_table

    @property
    def default(self) -> str:
        return f"{self.table}_default"

    def name_of(self, day: date) -> str:
        return f"{self.table}_p{day:%Y%m%d}"


ATTEMPTS = Log(DeliveryAttempt, "delivered_at")
REQUESTS = Log(PostbackRequest, "first_at")
LOGS = (ATTEMPTS, REQUESTS)
# The attempt log's own names, which operators and pages read.
PARENT = ATTEMPTS.table
DEFAULT = ATTEMPTS.default

# (table, day) of the partitions this process has seen or made; rows of these need no query.
_known: set[tuple[str, date]] = set()
# (table, day) of partitions this process could not make -> when it may try again (monotonic
# seconds): a batch of rows must not wait LOCK_TIMEOUT again for each of them.
_failed: dict[tuple[str, date], float] = {}
RETRY_PAUSE_SECONDS = 60


@dataclass(frozen=True)
class DayPartition:
    day: date
    name: str


def partitioned() -> bool:
    """Whether the logs are partitioned here (PostgreSQL) or one table each (SQLite)."""
    return connection.vendor == "postgresql"


def day_of(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def bounds(day: date) -> tuple[datetime, datetime]:
    """The partition's range: from the day's UTC midnight up to (not including) the next."""
    start = datetime.combine(day, clock_time(), UTC)
    return start, start + timedelta(days=1)


def name_of(day: date) -> str:
    """The attempt log's partition of that day."""
    return ATTEMPTS.name_of(day)


def existing(log: Log = ATTEMPTS) -> list[DayPartition]:
    """The day partitions of the log, oldest first (the DEFAULT partition is not one)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT child.relname FROM pg_inherits JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "WHERE pg_inherits.inhparent = %s::regclass",
            [log.table],
        )
        names = [row[0] for row in cursor.fetchall()]
    pattern = re.compile(rf"^{re.escape(log.table)}_p(\d{{8}})$")
    found = [
        DayPartition(datetime.strptime(match[1], "%Y%m%d").date(), name)
        for name in names
        if (match := pattern.match(name))
    ]
    return sorted(found, key=lambda partition: partition.day)


def make_room_for(moments: Iterable[datetime]) -> None:
    """Every day these rows fall on has its partition in both logs, made now if it was
    missing. Never raises for a partition it could not make: the rows then go to the DEFAULT
    partition."""
    if not partitioned():
        return
    days = {day_of(moment) for moment in moments}
    for log in LOGS:
        if missing := {day for day in days if (log.table, day) not in _known}:
            ensure(missing, log)


def make_ahead(today: date | None = None) -> list[date]:
    """Partitions for yesterday, today and AHEAD_DAYS ahead, in both logs; returns the days
    made now in the attempt log."""
    if not partitioned():
        return []
    today = today or day_of(timezone.now())
    days = [today + timedelta(days=offset) for offset in range(-1, AHEAD_DAYS + 1)]
    made = ensure(days, ATTEMPTS)
    ensure(days, REQUESTS)
    return made


def make_ahead_if_possible() -> None:
    """make_ahead, logging instead of raising while the database is away (a worker starting
    during an outage goes on: its writes make their partitions when they come)."""
    try:
        make_ahead()
    except DatabaseError:
        logger.warning("could not make the attempt log's partitions ahead; writes will make them", exc_info=True)


def ensure(days: Iterable[date], log: Log = ATTEMPTS) -> list[date]:
    """Make the partitions these days lack; returns the days made (those that could not be are
    logged, and their rows go to the DEFAULT partition meanwhile)."""
    wanted = set(days)
    present = {partition.day for partition in existing(log)}
    _known.update((log.table, day) for day in present & wanted)
    made = []
    now = time.monotonic()
    for day in sorted(wanted - present):
        if _failed.get((log.table, day), 0.0) > now:
            continue  # tried lately: its rows go to the DEFAULT partition until the pause ends
        try:
            _create(log, day)
        except DatabaseError as exc:
            _failed[(log.table, day)] = now + RETRY_PAUSE_SECONDS
            logger.warning(
                "could not make %s's partition for %s (%s); its rows go to %s, trying again in %d s",
                log.table,
                day,
                str(exc).strip(),
                log.default,
                RETRY_PAUSE_SECONDS,
            )
            continue
        _known.add((log.table, day))
        made.append(day)
    return made


def _create(log: Log, day: date) -> None:
    """The day's partition; rows of that day already in the DEFAULT partition are moved into
    it (PostgreSQL refuses to make a partition whose rows sit in the DEFAULT one)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # The lock CREATE TABLE ... PARTITION OF takes anyway, taken first: two processes that
        # read the DEFAULT partition first and then both asked for it would deadlock, one
        # losing a second to the deadlock check and leaving its day unmade.
        cursor.execute(f"LOCK TABLE {log.table} IN ACCESS EXCLUSIVE MODE")
        cursor.execute(f"SELECT 1 FROM {log.default} WHERE {_in_day(log, day)} LIMIT 1")
        if cursor.fetchone() is None:
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {log.name_of(day)} PARTITION OF {log.table} {_range(day)}")
        else:
            _create_from_default(cursor, log, day)


def _create_from_default(cursor: Any, log: Log, day: date) -> None:
    """Move the day's rows out of the DEFAULT partition into a new table, then attach that
    table as the day's partition (its CHECK lets the attach skip a scan)."""
    name = log.name_of(day)
    columns = ", ".join(connection.ops.quote_name(field.column) for field in log.model._meta.concrete_fields)
    for sql in [
        f"CREATE TABLE {name} (LIKE {log.table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
        f"WITH moved AS (DELETE FROM {log.default} WHERE {_in_day(log, day)} RETURNING {columns}) "
        f"INSERT INTO {name} ({columns}) SELECT {columns} FROM moved",
        f"ALTER TABLE {name} ADD CONSTRAINT {name}_day CHECK ({_in_day(log, day)})",
        f"ALTER TABLE {log.table} ATTACH PARTITION {name} {_range(day)}",
        f"ALTER TABLE {name} DROP CONSTRAINT {name}_day",
    ]:
        cursor.execute(sql)


def _range(day: date) -> str:
    """The partition bound clause; DDL takes no parameters, and these literals come from a date."""
    start, end = bounds(day)
    return f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"


def _in_day(log: Log, day: date) -> str:
    start, end = bounds(day)
    return f"{log.column} >= '{start.isoformat()}' AND {log.column} < '{end.isoformat()}'"


def past(cutoff: datetime, log: Log = ATTEMPTS) -> list[DayPartition]:
    """The day partitions that hold nothing at or after `cutoff`: whole days past it."""
    return [partition for partition in existing(log) if bounds(partition.day)[1] <= cutoff]


def rows_in(partition: DayPartition) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {partition.name}")
        return int(cursor.fetchone()[0])


def rows_in_default(before: datetime, log: Log = ATTEMPTS) -> int:
    """Rows in the DEFAULT partition from before `before`."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {log.default} WHERE {log.column} < %s", [before])
        return int(cursor.fetchone()[0])


def drop(partition: DayPartition) -> None:
    """Drop a day's partition and its rows; waits at most LOCK_TIMEOUT for the log's lock."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cursor.execute(f"DROP TABLE {partition.name}")
    _known.difference_update(
        {(log.table, partition.day) for log in LOGS if partition.name == log.name_of(partition.day)}
    )


def forget_known() -> None:
    """Forget which partitions this process has seen or failed to make (tests that drop or
    make them)."""
    _known.clear()
    _failed.clear()
