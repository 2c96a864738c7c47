"""Migrations on a database that holds history: attempts recorded under 0003 get their hosts
and rollups from 0004 and 0005 exactly as the live code would count them."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from delivery.hosts import host_of
from delivery.models import DeliveryAttempt, DeliveryRollup, DeliverySeries
from delivery.rollups import add_to_rollups
from tests.conftest import sent_url

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("latest_migrations_after")]

BEFORE_ROLLUPS = [("delivery", "0003_circuit_breaker_admin")]
START = datetime(2026, 11, 27, 22, 58, 30, tzinfo=UTC)
URLS = [
    "http://Receiver.example/p?x=1",
    "https://receiver.example:443/p",
    "http://user:pw@other.example:8080/p#frag",
    "https://other.example:8443",
]
# (status, latency ms, outcome): latencies exact in binary, so sums compare exactly.
TRIES = [
    (200, 4.5, "success"),
    (200, 5.0, "success"),
    (204, 5.25, "success"),
    (503, 99.75, "retry"),
    (None, 30000.5, "retry"),
    (None, None, "deferred"),
    (404, 2500.0, "failed"),
    (301, 0.0, "failed"),
    (None, 12.25, "failed"),
]


def migrate(targets: list[tuple[str, str]]) -> Any:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def latest() -> list[tuple[str, str]]:
    leaves: list[tuple[str, str]] = MigrationExecutor(connection).loader.graph.leaf_nodes()
    return leaves


def every(model: Any) -> list[tuple[Any, ...]]:
    names = [field.name for field in model._meta.fields if field.name != "id"]
    return sorted(model.objects.values_list(*names))


def test_attempts_recorded_before_rollups_get_their_hosts_and_rollups_as_the_live_code_counts():
    old = migrate(BEFORE_ROLLUPS)
    Attempt = old.get_model("delivery", "DeliveryAttempt")
    Attempt.objects.bulk_create(
        Attempt(
            postback_id=f"p-{n}",
            attempt=1,
            method="GET",
            url=URLS[n % len(URLS)],
            delivered_at=START + timedelta(seconds=41 * n),  # across minutes and an hour
            response_code=status,
            response_time_ms=latency,
            outcome=outcome,
        )
        for n, (status, latency, outcome) in enumerate(TRIES * 5)
    )

    migrate(latest())

    rows = list(DeliveryAttempt.objects.all())
    assert all(row.host == host_of(sent_url(row.postback_id)) for row in rows)
    assert {row.host for row in rows} == {"receiver.example", "other.example:8080", "other.example:8443"}
    migrated = every(DeliveryRollup), every(DeliverySeries)
    assert len(migrated[0]) > 10 and len(migrated[1]) > 10
    DeliveryRollup.objects.all().delete()
    DeliverySeries.objects.all().delete()
    add_to_rollups(rows)
    assert migrated == (every(DeliveryRollup), every(DeliverySeries))


def test_rollups_from_before_maxima_take_their_attempts_maximum_or_else_their_histograms_bound():
    old = migrate(BEFORE_ROLLUPS)
    Attempt = old.get_model("delivery", "DeliveryAttempt")
    first, second = datetime(2026, 11, 27, 10, 1, tzinfo=UTC), datetime(2026, 11, 27, 10, 2, tzinfo=UTC)
    tries = [(first, 40.0), (first, 70.5), (second, 300.0), (second, 1027.0)]
    Attempt.objects.bulk_create(
        Attempt(
            postback_id=f"p-{n}",
            attempt=1,
            method="GET",
            url="http://r.example/",
            delivered_at=when,
            response_code=200,
            response_time_ms=ms,
            outcome="success",
        )
        for n, (when, ms) in enumerate(tries)
    )
    before_maxima = migrate([("delivery", "0010_per_host_cap_off_by_default")])
    before_maxima.get_model("delivery", "DeliveryAttempt").objects.filter(response_time_ms=1027.0).delete()  # pruned

    migrate(latest())

    minutes = dict(DeliveryRollup.objects.values_list("minute", "latency_ms_max"))
    assert minutes == {first: 70.5, second: 2500.0}  # whole: exact; pruned in part: its bucket's top
    all_hosts = dict(DeliverySeries.objects.filter(span=60, host="*").values_list("start", "latency_ms_max"))
    assert all_hosts == {first: 70.5, second: 2500.0}
    hours = set(DeliverySeries.objects.filter(span=3600).values_list("host", "latency_ms_max"))
    assert hours == {("r.example", 2500.0), ("*", 2500.0)}
