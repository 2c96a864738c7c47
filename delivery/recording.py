"""Recording attempts: one DeliveryAttempt row and one JSON log line per try, and one
PostbackRequest row per postback (what it sends, stored once for all its tries).

The log has a line for each row written, and for nothing else: a try recorded already (a
deferred try deferred again keeps its first row; a try written again after a crash) adds no
row and no line. The one exception is a row the database refuses even without its texts: its
line is then its only record, and an error line says so.

This is the hot path (thousands of tries a second per worker), so a try is recorded as a
`Record`, not a model instance, and written with plain SQL: in bulk, one INSERT per batch of
finished tries, with their per-minute rollups in the same transaction (`delivery.rollups`).
What a receiver sends back is not ours to trust: text the database refuses is escaped first
(`storable`), a batch that fails anyway is written row by row so that one bad row cannot cost
the others their records, and while the database is unreachable the rows wait in memory and
the write is tried again.

Rows keep the receiver's response body as the `store_response_body` setting says (all tries,
failures only, or none); the log line carries it whatever the setting.
"""

import contextlib
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.db.models import Field, Model
from django.utils import timezone

from delivery import partitions
from delivery.models import RECORDED_WITHIN, DeliveryAttempt, Outcome, PostbackRequest, ResponseBodyPolicy
from delivery.rollups import add_to_rollups
from delivery.transport import Response
from postbackproject.metrics import DELIVERY_ATTEMPTS, DELIVERY_DEFERRALS, DELIVERY_DURATION
from postbackproject.postback import Try

attempt_log = logging.getLogger("delivery.attempts")
logger = logging.getLogger(__name__)

# How long a batch of rows waits for an unreachable database before the job gives up (its
# entries then go to another drainer, which sends them again: at-least-once, never lost).
DATABASE_OUTAGE_SECONDS = 600
_RETRY_WAITS = (0.2, 0.5, 1.0, 2.0, 5.0)


# Longest texts a row keeps. URLs and request bodies are bounded before this (max_url_bytes,
# INGEST_MAX_BODY_BYTES) and reply bodies by response_body_max_bytes; these bounds stand for
# tries that came from Redis without passing those checks.
TEXT_MAX_CHARS = 1024 * 1024
ERROR_MAX_CHARS = 2000


def storable(text: str, limit: int = TEXT_MAX_CHARS) -> str:
    """Text every database accepts, at most `limit` characters: NUL becomes the four
    characters `\\x00` and each unpaired surrogate its `\\udXXX` escape; everything else is
    kept as it came."""
    text = text[:limit]
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode()
    return text


@dataclass(slots=True)
class Record:
    """One try as recorded: the columns of its DeliveryAttempt row and of its postback's
    PostbackRequest row (`first_at` is the try's `delivered_at`), and every field of its log line."""

    postback_id: str
    attempt: int
    method: str
    url: str
    host: str
    request_body: str
    delivered_at: datetime
    response_code: int | None
    response_time_ms: float | None
    response_body: str
    error: str
    outcome: str
    sender: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # the sender's, as sent


def attempt_record(item: Try, host: str, response: Response, outcome: Outcome) -> Record:
    return Record(
        item.postback_id,
        item.attempt,
        item.method,
        storable(item.url),
        host[:255],
        storable(item.body or ""),
        response.delivered_at,
        response.status,
        round(response.elapsed_ms, 2),
        storable(response.body),
        storable(response.error, ERROR_MAX_CHARS),
        str(outcome),
        item.sender,
        item.headers,
    )


def deferral_record(item: Try, host: str, reason: str, until: datetime) -> Record:
    """A try that was not sent: its circuit is open. The row says why and until when."""
    error = f"not sent: {reason} (deferred until {until.isoformat(timespec='seconds')})"
    return Record(
        item.postback_id,
        item.attempt,
        item.method,
        storable(item.url),
        host[:255],
        storable(item.body or ""),
        timezone.now(),
        None,
        None,
        "",
        error,
        str(Outcome.DEFERRED),
        item.sender,
        item.headers,
    )


def keeps_response_body(row: Record, policy: str) -> bool:
    """Whether a row stored under this `store_response_body` policy keeps its response body."""
    if policy == ResponseBodyPolicy.FAILURES:
        return row.outcome != Outcome.SUCCESS
    return policy == ResponseBodyPolicy.ALL


def insert_new_attempts(rows: Sequence[Record], chunk: int = 500, bodies: str = ResponseBodyPolicy.ALL) -> list[Record]:
    """INSERT the rows, skipping tries already recorded, and the request of each postback not
    recorded yet; returns the rows really inserted. Each row keeps its response body only if
    the `bodies` policy says so (the Records keep theirs, for the log).

    A try is recorded once per outcome: written again after a crash, or deferred again while
    its circuit stays open, it adds no row. The INSERT itself looks for the try (within
    RECORDED_WITHIN before the row's start, so that on PostgreSQL it reads one or two day
    partitions), because a partitioned table cannot hold a unique constraint on it. Two
    workers writing the same try at the same instant (only after a lost lease) could both
    write it: the log is at least once, like delivery. Requests are written the same way,
    once per postback within RECORDED_WITHIN.

    Django's bulk_create(ignore_conflicts=True) cannot say which rows it skipped, and the
    rollups must not count a skipped one; preparing values field by field also cost more than
    the SQL itself.
    """
    firsts: dict[tuple[str, int, str], Record] = {}
    for row in rows:
        firsts.setdefault((row.postback_id, row.attempt, row.outcome), row)
    unique = list(firsts.values())
    inserted: list[Record] = []
    with connection.cursor() as cursor:
        for start in range(0, len(unique), chunk):
            part = unique[start : start + chunk]
            requests = list({row.postback_id: row for row in reversed(part)}.values())  # the first of each
            cursor.execute(
                NEW_REQUESTS.sql(len(requests)), [value for row in requests for value in _request_values(row)]
            )
            cursor.execute(
                NEW_ATTEMPTS.sql(len(part)),
                [value for row in part for value in _attempt_values(row, keeps_response_body(row, bodies))],
            )
            inserted.extend(firsts[(pid, attempt, outcome)] for pid, attempt, outcome in cursor.fetchall())
    return inserted


class NewRows:
    """An INSERT ... SELECT of VALUES rows that skips each row already recorded: one whose
    `key` columns match a row whose `time` column is at or after the row's `since` (its last
    VALUES column). VALUES columns are called column1, column2, ... on both databases."""

    def __init__(self, model: type[Model], columns: tuple[str, ...], key: tuple[str, ...], time: str) -> None:
        self.model, self.columns, self.key, self.time = model, columns, key, time

    def sql(self, count: int) -> str:
        head, row_sql, tail = self._parts
        return f"{head}{', '.join([row_sql] * count)}{tail}"

    @functools.cached_property
    def _parts(self) -> tuple[str, str, str]:
        quote = connection.ops.quote_name
        table = quote(self.model._meta.db_table)
        row_sql = "(" + ", ".join(self._placeholder(name) for name in (*self.columns, self.time)) + ")"
        value = {name: f"new.column{number}" for number, name in enumerate(self.columns, start=1)}
        since = f"new.column{len(self.columns) + 1}"
        same = " AND ".join(f"old.{quote(name)} = {value[name]}" for name in self.key)
        head = (
            f"INSERT INTO {table} ({', '.join(quote(name) for name in self.columns)}) "
            f"SELECT {', '.join(value.values())} FROM (VALUES "
        )
        tail = (
            f") AS new WHERE NOT EXISTS (SELECT 1 FROM {table} AS old WHERE {same} "
            f"AND old.{quote(self.time)} >= {since}) RETURNING {', '.join(quote(name) for name in self.key)}"
        )
        return head, row_sql, tail

    def _placeholder(self, name: str) -> str:
        """A VALUES placeholder; on PostgreSQL cast to its column's type, which a column of
        NULLs (every row deferred, say) would not otherwise have."""
        if connection.vendor != "postgresql":
            return "%s"
        field = self.model._meta.get_field(name)
        assert isinstance(field, Field)
        return f"CAST(%s AS {field.db_type(connection)})"


# The columns each table takes from a Record (a Record has them all, for the log line).
ATTEMPT_COLUMNS = (
    "postback_id",
    "attempt",
    "host",
    "delivered_at",
    "response_code",
    "response_time_ms",
    "response_body",
    "error",
    "outcome",
)
REQUEST_COLUMNS = ("postback_id", "method", "url", "host", "request_body", "sender", "headers", "first_at")
NEW_ATTEMPTS = NewRows(DeliveryAttempt, ATTEMPT_COLUMNS, ("postback_id", "attempt", "outcome"), "delivered_at")
NEW_REQUESTS = NewRows(PostbackRequest, REQUEST_COLUMNS, ("postback_id",), "first_at")


def _attempt_values(row: Record, with_body: bool) -> tuple[Any, ...]:
    """The row's ATTEMPT_COLUMNS as the database takes them, then the time from which to look
    for the try recorded before; the response body empty unless `with_body`."""
    adapt = connection.ops.adapt_datetimefield_value
    return (
        row.postback_id,
        row.attempt,
        row.host,
        adapt(row.delivered_at),
        row.response_code,
        row.response_time_ms,
        row.response_body if with_body else "",
        row.error,
        row.outcome,
        adapt(row.delivered_at - RECORDED_WITHIN),
    )


def _request_values(row: Record) -> tuple[Any, ...]:
    """The row's REQUEST_COLUMNS (first sent: this try's start), then the time from which to
    look for the request recorded before."""
    adapt = connection.ops.adapt_datetimefield_value
    return (
        row.postback_id,
        row.method,
        row.url,
        row.host,
        row.request_body,
        row.sender,
        _headers_json(row.headers),
        adapt(row.delivered_at),
        adapt(row.delivered_at - RECORDED_WITHIN),
    )


def _headers_json(headers: tuple[tuple[str, str], ...]) -> str:
    """The sender's headers as the JSON column takes them (an object, `{}` for none), with text
    every database accepts."""
    if not headers:
        return "{}"
    return json.dumps({storable(name): storable(value) for name, value in headers}, ensure_ascii=False)


def save_attempts(
    rows: Sequence[Record], wait: Callable[[float], None] = time.sleep, bodies: str = ResponseBodyPolicy.ALL
) -> list[Record]:
    """Insert rows, retrying while the database is down; one bad row never costs the others.
    Returns the rows to log: those written (not those recorded before), and any the database
    refused outright. Rows keep their response bodies as the `bodies` policy says.

    `wait(seconds)` passes the time between retries: a drainer renews its lease there (so that
    nobody takes its entries meanwhile) and takes the replies of requests already sent.
    """
    if not rows:
        return []
    deadline = time.monotonic() + DATABASE_OUTAGE_SECONDS
    failures = 0
    while True:
        try:
            return _insert(rows, bodies)
        except (OperationalError, InterfaceError):
            pause = _RETRY_WAITS[min(failures, len(_RETRY_WAITS) - 1)]
            failures += 1
            if time.monotonic() + pause > deadline:
                raise
            logger.warning("database unavailable, %d attempt rows wait; trying again in %.1f s", len(rows), pause)
            _reconnect()
            wait(pause)


def _insert(rows: Sequence[Record], bodies: str) -> list[Record]:
    # Before the rows' transaction: making a partition locks the whole log for a moment.
    partitions.make_room_for(row.delivered_at for row in rows)
    try:
        return _insert_counted(rows, bodies)
    except (OperationalError, InterfaceError):
        raise
    except DatabaseError:
        logger.warning("bulk insert of %d attempt rows refused; writing them one by one", len(rows), exc_info=True)
        return [written for row in rows for written in _insert_one(row, bodies)]


def _insert_counted(rows: Sequence[Record], bodies: str) -> list[Record]:
    """The rows and their rollups, in one transaction: counted if and only if inserted.
    Returns the rows inserted."""
    with transaction.atomic():
        inserted = insert_new_attempts(rows, bodies=bodies)
        add_to_rollups(inserted)
    return inserted


def _insert_one(row: Record, bodies: str) -> list[Record]:
    """One row alone; if the database still refuses it, the row keeps only what it accepts.
    Returns it if it was inserted, or could not be at all (to be logged: its only record)."""
    try:
        return _insert_counted([row], bodies)
    except (OperationalError, InterfaceError):
        raise
    except DatabaseError as exc:
        refusal = f"{type(exc).__name__}: {exc}"
    row.response_body = ""
    row.request_body = ""
    row.error = storable(f"{row.error} [this row's texts were refused by the database: {refusal}]", ERROR_MAX_CHARS)
    try:
        return _insert_counted([row], bodies)
    except (OperationalError, InterfaceError):
        raise
    except DatabaseError:
        logger.exception("attempt %s try %s could not be recorded; its log line stands", row.postback_id, row.attempt)
        return [row]


def _reconnect() -> None:
    with contextlib.suppress(DatabaseError):
        connection.close()
    close_old_connections()


def count_in_metrics(rows: Sequence[Record]) -> None:
    """Attempts by outcome and their durations, deferrals apart (nothing was sent)."""
    outcomes = Counter(row.outcome for row in rows)
    if deferred := outcomes.pop(Outcome.DEFERRED, 0):
        DELIVERY_DEFERRALS.inc(deferred)
    for outcome, count in outcomes.items():
        DELIVERY_ATTEMPTS.labels(outcome).inc(count)
    for row in rows:
        if row.response_time_ms is not None and row.outcome != Outcome.DEFERRED:
            DELIVERY_DURATION.observe(row.response_time_ms / 1000)


def log_attempts(rows: Sequence[Record]) -> None:
    """One JSON line per row written, with the same facts as the row (one log call per batch)."""
    if rows:
        attempt_log.info("\n".join(attempt_log_line(row) for row in rows))


def attempt_log_line(row: Record) -> str:
    return json.dumps(_log_fields(row), ensure_ascii=False)


def _log_fields(row: Record) -> dict[str, object]:
    return {
        "event": "delivery_attempt",
        "postback_id": row.postback_id,
        "attempt": row.attempt,
        "method": row.method,
        "url": row.url,
        "delivered_at": row.delivered_at.isoformat(),
        "response_code": row.response_code,
        "response_time_ms": row.response_time_ms,
        "response_body": row.response_body,
        "error": row.error,
        "outcome": row.outcome,
        "sender": row.sender,
        # Names only: values may hold a receiver's credentials, which no log line should carry.
        "header_names": [name for name, _ in row.headers],
    }
