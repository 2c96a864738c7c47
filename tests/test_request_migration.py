"""Migration 0015: each postback's request moved out of its attempt rows into one
PostbackRequest row, on both databases, and back again."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from delivery.recording import ATTEMPT_COLUMNS

BEFORE = [("delivery", "0014_attempt_log_partitioned_by_day")]
AFTER = [("delivery", "0015_requests_stored_once")]
START = datetime(2030, 8, 1, 23, 59, tzinfo=UTC)


def migrate(targets: list[tuple[str, str]]) -> Any:
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def attempts(apps: Any, *fields: str) -> list[tuple[Any, ...]]:
    return sorted(apps.get_model("delivery", "DeliveryAttempt").objects.values_list("id", *fields))


KEPT = ATTEMPT_COLUMNS


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("latest_migrations_after")
def test_each_postback_gets_one_request_row_from_its_first_try_and_attempts_keep_the_rest():
    apps = migrate(BEFORE)
    old = apps.get_model("delivery", "DeliveryAttempt")
    for n in range(3):  # three postbacks, tried three times each, across midnight UTC
        for number in (1, 2, 3):
            old.objects.create(
                postback_id=f"p-{n}",
                attempt=number,
                method="POST",
                url=f"https://h{n}.example/x?n={n}&v=%C3%A9",
                host=f"h{n}.example",
                request_body=f'{{"n": {n}}}',
                delivered_at=START + timedelta(minutes=number * 10 + n),
                response_code=None if number == 1 else 500 + number,
                response_time_ms=None if number == 1 else 10.5 * number,
                response_body="" if number < 3 else "busy",
                error="timed out" if number == 1 else "",
                outcome="retry" if number < 3 else "failed",
            )
    before = attempts(apps, *KEPT)
    sent_before = attempts(apps, "postback_id", "method", "url", "host", "request_body")

    apps = migrate(AFTER)

    assert attempts(apps, *KEPT) == before
    requests = apps.get_model("delivery", "PostbackRequest").objects.order_by("postback_id")
    assert [(r.postback_id, r.method, r.url, r.host, r.request_body, r.first_at) for r in requests] == [
        (
            f"p-{n}",
            "POST",
            f"https://h{n}.example/x?n={n}&v=%C3%A9",
            f"h{n}.example",
            f'{{"n": {n}}}',
            START + timedelta(minutes=10 + n),
        )
        for n in range(3)
    ]

    apps = migrate(BEFORE)

    assert attempts(apps, "postback_id", "method", "url", "host", "request_body") == sent_before
    assert attempts(apps, *KEPT) == before
