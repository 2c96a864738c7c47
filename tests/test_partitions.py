"""The attempt log partitioned by UTC day on PostgreSQL: partitions made ahead and on demand,
rows of a day in its partition, whole days dropped by retention, and the migration that
partitions a log in place keeping every row (that one runs on SQLite too, where the log stays
one table)."""

import io
import threading
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from delivery import partitions
from delivery.models import RECORDED_WITHIN, DeliveryAttempt, PostbackRequest
from delivery.recording import save_attempts
from delivery.retention import prune_attempts, prune_requests
from tests.test_dashboard import attempt

pytestmark = pytest.mark.django_db

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="the attempt log is partitioned on PostgreSQL only; SQLite keeps one table",
)

BEFORE = [("delivery", "0013_indexes_the_pages_use")]
AFTER = [("delivery", "0014_attempt_log_partitioned_by_day")]


def days() -> list[date]:
    return [partition.day for partition in partitions.existing()]


def where(postback_id: str, log: partitions.Log = partitions.ATTEMPTS) -> str:
    """The table (partition) of the log that holds the postback's rows."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT DISTINCT tableoid::regclass::text FROM {log.table} WHERE postback_id = %s", [postback_id]
        )
        return ", ".join(row[0] for row in cursor.fetchall())


@postgresql_only
def test_partitions_are_made_from_yesterday_to_the_days_ahead():
    today = date(2031, 3, 10)

    made = partitions.make_ahead(today)

    expected = [today + timedelta(days=n) for n in range(-1, partitions.AHEAD_DAYS + 1)]
    assert made == expected
    assert set(expected) <= set(days())
    assert partitions.make_ahead(today) == []  # made once


@postgresql_only
def test_rows_either_side_of_midnight_utc_go_to_their_own_days():
    midnight = datetime(2031, 5, 2, tzinfo=UTC)
    save_attempts(
        [
            attempt(midnight - timedelta(microseconds=1), postback="before"),
            attempt(midnight, postback="at"),
            attempt(datetime(2031, 5, 2, 1, 30, tzinfo=timezone.get_fixed_timezone(120)), postback="local"),
        ]
    )

    assert where("before") == "delivery_deliveryattempt_p20310501"
    assert where("at") == "delivery_deliveryattempt_p20310502"
    assert where("local") == "delivery_deliveryattempt_p20310501"  # 23:30 UTC the day before
    assert where("before", partitions.REQUESTS) == "delivery_postbackrequest_p20310501"
    assert where("at", partitions.REQUESTS) == "delivery_postbackrequest_p20310502"


@postgresql_only
def test_a_worker_writing_a_day_without_a_partition_makes_it_and_loses_nothing():
    far = datetime(2033, 1, 1, 12, tzinfo=UTC)
    assert date(2033, 1, 1) not in days()

    written = save_attempts([attempt(far, postback="far")])

    assert [record.postback_id for record in written] == ["far"]
    assert date(2033, 1, 1) in days()
    assert where("far") == "delivery_deliveryattempt_p20330101"


@postgresql_only
def test_rows_that_went_to_the_default_partition_move_into_their_day_when_it_is_made():
    day = datetime(2034, 6, 1, 8, tzinfo=UTC)
    # Written through the ORM, which makes no partition: the DEFAULT one takes them.
    for n in range(3):
        DeliveryAttempt.objects.create(postback_id=f"stray-{n}", attempt=1, delivered_at=day, outcome="success")
    assert where("stray-0") == partitions.DEFAULT

    assert partitions.ensure([day.date()]) == [day.date()]

    assert where("stray-0") == where("stray-2") == "delivery_deliveryattempt_p20340601"
    assert DeliveryAttempt.objects.filter(postback_id__startswith="stray-").count() == 3
    assert partitions.rows_in_default(before=datetime(2100, 1, 1, tzinfo=UTC)) == 0


@postgresql_only
def test_retention_drops_whole_days_past_the_window_and_keeps_the_day_it_ends_in():
    cutoff = datetime(2032, 3, 10, 15, tzinfo=UTC)
    save_attempts(
        [
            attempt(datetime(2032, 3, 7, 12, tzinfo=UTC), postback="three-days-past"),
            attempt(datetime(2032, 3, 8, 12, tzinfo=UTC), postback="two-days-past"),
            attempt(datetime(2032, 3, 9, 23, 59, tzinfo=UTC), postback="day-past"),
            attempt(datetime(2032, 3, 10, 1, tzinfo=UTC), postback="same-day-before-cutoff"),
            attempt(datetime(2032, 3, 10, 16, tzinfo=UTC), postback="same-day-after-cutoff"),
            attempt(datetime(2032, 3, 11, 1, tzinfo=UTC), postback="next-day"),
        ]
    )
    DeliveryAttempt.objects.create(  # in the DEFAULT partition: deleted row by row
        postback_id="stray", attempt=1, delivered_at=datetime(2020, 1, 1, tzinfo=UTC)
    )
    before = sorted(DeliveryAttempt.objects.values_list("postback_id", flat=True))

    assert [partition.day for partition in partitions.past(cutoff)][-2:] == [date(2032, 3, 8), date(2032, 3, 9)]
    assert prune_attempts(cutoff, dry_run=True) == 4
    assert sorted(DeliveryAttempt.objects.values_list("postback_id", flat=True)) == before

    assert prune_attempts(cutoff) == 4

    assert sorted(DeliveryAttempt.objects.values_list("postback_id", flat=True)) == [
        "next-day",
        "same-day-after-cutoff",
        "same-day-before-cutoff",
    ]
    assert date(2032, 3, 9) not in days()
    assert date(2032, 3, 10) in days()
    # Requests are kept RECORDED_WITHIN longer: those of the two days before the cutoff stay.
    assert prune_requests(cutoff - RECORDED_WITHIN) == 1
    assert sorted(PostbackRequest.objects.values_list("postback_id", flat=True)) == [
        "day-past",
        "next-day",
        "same-day-after-cutoff",
        "same-day-before-cutoff",
        "two-days-past",
    ]


@postgresql_only
def test_prunehistory_says_what_it_would_drop_and_makes_the_days_ahead():
    old = timezone.now() - timedelta(days=45)
    save_attempts([attempt(old, postback="old")])
    out = io.StringIO()

    call_command("prunehistory", "--dry-run", stdout=out)

    name = partitions.name_of(old.astimezone(UTC).date())
    assert f"would drop 1 day partitions of the attempt log: {name} (1 rows)" in out.getvalue()
    assert "would delete 1 attempts" in out.getvalue()
    assert where("old") == name

    call_command("prunehistory", stdout=out)

    assert not DeliveryAttempt.objects.filter(postback_id="old").exists()
    today = timezone.now().astimezone(UTC).date()
    assert today + timedelta(days=partitions.AHEAD_DAYS) in days()


def snapshot(model: Any) -> list[tuple[Any, ...]]:
    fields = [field.attname for field in model._meta.concrete_fields]
    return sorted(model.objects.values_list(*fields))


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("latest_migrations_after")
def test_the_migration_keeps_every_row_and_field_and_can_be_undone():
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    old = executor.loader.project_state(BEFORE).apps.get_model("delivery", "DeliveryAttempt")
    midnight = datetime(2030, 8, 1, tzinfo=UTC)
    for n, when in enumerate([midnight - timedelta(microseconds=1), midnight, midnight + timedelta(days=3)]):
        old.objects.create(
            postback_id=f"kept-{n}",
            attempt=n + 1,
            method="POST",
            url=f"https://h{n}.example/x?n={n}",
            host=f"h{n}.example",
            request_body='{"a": "é"}',
            delivered_at=when,
            response_code=None if n == 0 else 500,
            response_time_ms=None if n == 0 else 12.5,
            response_body="" if n == 0 else "busy",
            error="timed out" if n == 0 else "",
            outcome="retry",
        )
    rows = snapshot(old)

    executor = MigrationExecutor(connection)
    executor.migrate(AFTER)
    new = executor.loader.project_state(AFTER).apps.get_model("delivery", "DeliveryAttempt")

    assert snapshot(new) == rows
    later = new.objects.create(postback_id="later", attempt=1, delivered_at=midnight)
    assert later.pk > max(row[0] for row in rows)
    if connection.vendor == "postgresql":
        assert where("kept-0") == "delivery_deliveryattempt_p20300731"
        assert where("kept-1") == "delivery_deliveryattempt_p20300801"
        assert where("kept-2") == "delivery_deliveryattempt_p20300804"

    everything = snapshot(new)

    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    back = executor.loader.project_state(BEFORE).apps.get_model("delivery", "DeliveryAttempt")
    assert snapshot(back) == everything


@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_two_processes_making_the_same_days_at_once_both_succeed(caplog):
    """Workers start together and make the days ahead together: neither may lose its days to
    a deadlock (each used to read the DEFAULT partition, then ask for the lock to create)."""
    days = [date(2035, 4, 1) + timedelta(days=n) for n in range(4)]
    start = threading.Barrier(2)
    made: list[list[date]] = []

    def make() -> None:
        try:
            start.wait(timeout=10)
            made.append(partitions.ensure(days) + partitions.ensure(days, partitions.REQUESTS))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=make) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert "could not make" not in caplog.text
    assert set(days) <= {p.day for p in partitions.existing()}
    assert set(days) <= {p.day for p in partitions.existing(partitions.REQUESTS)}
    for log in partitions.LOGS:
        for day in days:
            partitions.drop(partitions.DayPartition(day, log.name_of(day)))
