"""Each postback's request (method, URL as sent, body, host, and from now on its sender) stored
once in PostbackRequest,
and attempt rows narrowed to what each try adds (time, try, code, latency, outcome, error,
response body).

Existing data is moved in place: the first attempt of each postback gives its request row,
then the three columns are dropped from the attempt log. On PostgreSQL the dropped columns'
bytes stay in the rows already written until their day partition is dropped by retention (no
rewrite of the whole log during the migration); on SQLite `ALTER TABLE ... DROP COLUMN`
rewrites the table. On PostgreSQL the request table is partitioned by day of `first_at`, as
the attempt log is by `delivered_at` (migration 0014, `delivery.partitions`).

The SQL is written out here, not taken from `delivery.partitions`: a migration keeps doing
what it did when it was written.
"""

from datetime import UTC, datetime, time, timedelta

from django.db import migrations, models

ATTEMPTS = "delivery_deliveryattempt"
REQUESTS = "delivery_postbackrequest"
AHEAD_DAYS = 3


def _day_range(day) -> str:
    start = datetime.combine(day, time(), UTC)
    return f"FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')"


def partition_requests(apps, schema_editor) -> None:
    """The request table (empty yet) made again, partitioned by day, with the partitions the
    attempts' days and the days ahead need."""
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE {REQUESTS}_by_day (LIKE {REQUESTS} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            "INCLUDING IDENTITY) PARTITION BY RANGE (first_at)"
        )
        cursor.execute(f"DROP TABLE {REQUESTS}")
        cursor.execute(f"ALTER TABLE {REQUESTS}_by_day RENAME TO {REQUESTS}")
        cursor.execute(f"ALTER TABLE {REQUESTS} ADD CONSTRAINT {REQUESTS}_pkey PRIMARY KEY (id, first_at)")
        # The model's indexes come after this step, when Django runs the SQL it deferred: on
        # the partitioned table, after the rows are in.
        cursor.execute(f"CREATE TABLE {REQUESTS}_default PARTITION OF {REQUESTS} DEFAULT")
        cursor.execute(
            "SELECT child.relname FROM pg_inherits JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "WHERE pg_inherits.inhparent = %s::regclass",
            [ATTEMPTS],
        )
        prefix = f"{ATTEMPTS}_p"
        days = {
            datetime.strptime(name[len(prefix) :], "%Y%m%d").date()
            for (name,) in cursor.fetchall()
            if name.startswith(prefix)
        }
        today = datetime.now(UTC).date()
        days |= {today + timedelta(days=n) for n in range(-1, AHEAD_DAYS + 1)}
        for day in sorted(days):
            cursor.execute(f"CREATE TABLE {REQUESTS}_p{day:%Y%m%d} PARTITION OF {REQUESTS} {_day_range(day)}")


def one_request_per_postback(apps, schema_editor) -> None:
    """A request row for each postback, from its first attempt (its sender was not recorded)."""
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {REQUESTS} (postback_id, method, url, host, request_body, sender, first_at) "
            "SELECT postback_id, method, url, host, request_body, '', delivered_at FROM ("
            "  SELECT postback_id, method, url, host, request_body, delivered_at, "
            "  ROW_NUMBER() OVER (PARTITION BY postback_id ORDER BY delivered_at, id) AS number "
            f"  FROM {ATTEMPTS}"
            ") AS tries WHERE number = 1"
        )


def requests_back_into_attempts(apps, schema_editor) -> None:
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {ATTEMPTS} SET method = sent.method, url = sent.url, request_body = sent.request_body "
            f"FROM {REQUESTS} AS sent WHERE sent.postback_id = {ATTEMPTS}.postback_id"
        )


class Migration(migrations.Migration):
    dependencies = [
        ("delivery", "0014_attempt_log_partitioned_by_day"),
    ]

    operations = [
        migrations.CreateModel(
            name="PostbackRequest",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("postback_id", models.CharField(max_length=64)),
                ("method", models.CharField(max_length=7)),
                ("url", models.TextField(help_text="The URL as sent, placeholders replaced.")),
                (
                    "host",
                    models.CharField(
                        blank=True, help_text="The URL's host[:port], as circuits count it.", max_length=255
                    ),
                ),
                ("request_body", models.TextField(blank=True, help_text="The JSON body sent (POST, PUT, PATCH).")),
                (
                    "sender",
                    models.CharField(
                        blank=True,
                        help_text='Who sent the request: "key 12" for sender key 12, else the client\'s address.',
                        max_length=100,
                    ),
                ),
                ("first_at", models.DateTimeField(help_text="When the first try recorded with this row started.")),
            ],
            options={
                "indexes": [
                    models.Index(fields=["postback_id", "first_at"], name="request_postback"),
                    models.Index(fields=["first_at"], name="request_first_at"),
                ],
            },
        ),
        migrations.RunPython(partition_requests, migrations.RunPython.noop),
        migrations.RunPython(one_request_per_postback, requests_back_into_attempts),
        # Defaults first, so that undoing the removal can add the columns back to a log that
        # has rows; the step before fills them.
        migrations.AlterField(model_name="deliveryattempt", name="method", field=models.CharField(default="", max_length=7)),
        migrations.AlterField(
            model_name="deliveryattempt",
            name="url",
            field=models.TextField(default="", help_text="The URL as sent, placeholders replaced."),
        ),
        migrations.RemoveField(model_name="deliveryattempt", name="method"),
        migrations.RemoveField(model_name="deliveryattempt", name="url"),
        migrations.RemoveField(model_name="deliveryattempt", name="request_body"),
        migrations.AlterField(
            model_name="deliveryattempt",
            name="host",
            field=models.CharField(
                blank=True,
                help_text="The URL's host[:port], as circuits count it; kept on each attempt too, because every "
                "per-host page and admin's search filter attempts by it.",
                max_length=255,
            ),
        ),
    ]
