"""The attempt log partitioned by day on PostgreSQL (`delivery.partitions`); one table on SQLite.

The unique constraint on (postback_id, attempt, outcome) becomes a plain index: a partitioned
table's unique constraints must hold its partition key, and the check that keeps a try
recorded once is made by the INSERT itself (`delivery.recording.insert_new_attempts`).

On PostgreSQL the table is rebuilt in place: renamed aside, a partitioned table made in its
name with a partition per day its rows cover (and the days ahead), the rows copied, the
indexes built once over the copied rows, the old table dropped. The service is stopped while
`migrate` runs, as for every migration; docs/performance.md has the time it takes.

The SQL is written out here, not taken from `delivery.partitions`: a migration keeps doing
what it did when it was written.
"""

from datetime import UTC, date, datetime, time, timedelta

from django.db import migrations, models

TABLE = "delivery_deliveryattempt"
ASIDE = f"{TABLE}_before_0014"
INDEXES = {
    "attempt_delivered_at": "(delivered_at)",
    "attempt_outcome_time": "(outcome, delivered_at)",
    "attempt_host_outcome_time": "(host, outcome, delivered_at)",
    "attempt_postback_try": "(postback_id, attempt, outcome)",
}
PRIMARY_KEY = f"{TABLE}_pkey"
AHEAD_DAYS = 3


def _day_range(day: date) -> str:
    start = datetime.combine(day, time(), UTC)
    return f"FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')"


def _set_aside(cursor) -> None:
    """The table and its index names moved out of the way, so that its successor takes them."""
    cursor.execute(f"ALTER TABLE {TABLE} RENAME TO {ASIDE}")
    cursor.execute(f"ALTER TABLE {ASIDE} RENAME CONSTRAINT {PRIMARY_KEY} TO {ASIDE}_pkey")
    for name in INDEXES:
        cursor.execute(f"ALTER INDEX {name} RENAME TO {name}_before_0014")


def _copy_and_index(cursor, primary_key_columns: str) -> None:
    cursor.execute(f"INSERT INTO {TABLE} SELECT * FROM {ASIDE}")
    cursor.execute(
        f"SELECT setval(pg_get_serial_sequence('{TABLE}', 'id'), coalesce((SELECT max(id) FROM {TABLE}), 0) + 1, false)"
    )
    cursor.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {PRIMARY_KEY} PRIMARY KEY ({primary_key_columns})")
    for name, columns in INDEXES.items():
        cursor.execute(f"CREATE INDEX {name} ON {TABLE} {columns}")
    cursor.execute(f"DROP TABLE {ASIDE} CASCADE")
    cursor.execute(f"ANALYZE {TABLE}")


def partition_by_day(apps, schema_editor) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        _set_aside(cursor)
        cursor.execute(
            f"CREATE TABLE {TABLE} (LIKE {ASIDE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY) PARTITION BY RANGE (delivered_at)"
        )
        cursor.execute(f"CREATE TABLE {TABLE}_default PARTITION OF {TABLE} DEFAULT")
        cursor.execute(f"SELECT DISTINCT (delivered_at AT TIME ZONE 'UTC')::date FROM {ASIDE}")
        today = datetime.now(UTC).date()
        days = {row[0] for row in cursor.fetchall()} | {today + timedelta(days=n) for n in range(-1, AHEAD_DAYS + 1)}
        for day in sorted(days):
            cursor.execute(f"CREATE TABLE {TABLE}_p{day:%Y%m%d} PARTITION OF {TABLE} {_day_range(day)}")
        _copy_and_index(cursor, "id, delivered_at")


def one_table_again(apps, schema_editor) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        _set_aside(cursor)
        cursor.execute(f"CREATE TABLE {TABLE} (LIKE {ASIDE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY)")
        _copy_and_index(cursor, "id")


class Migration(migrations.Migration):
    dependencies = [
        ("delivery", "0013_indexes_the_pages_use"),
    ]

    operations = [
        migrations.RemoveConstraint(model_name="deliveryattempt", name="one_row_per_try_outcome"),
        migrations.AddIndex(
            model_name="deliveryattempt",
            index=models.Index(fields=["postback_id", "attempt", "outcome"], name="attempt_postback_try"),
        ),
        migrations.RunPython(partition_by_day, one_table_again),
    ]
