"""Per-minute rollups stay equal to what they summarise: attempts counted once whatever the
reruns, accepted postbacks folded from Redis once whatever the crashes."""

import time
from datetime import UTC, datetime

import pytest
from django.db.models import Count, Sum

from delivery import rollups
from delivery.models import (
    ALL_HOSTS,
    LATENCY_BUCKETS,
    AcceptedRollup,
    DeliveryAttempt,
    DeliveryRollup,
    DeliverySeries,
    DeliverySettings,
    RollupFold,
    Span,
)
from delivery.recording import Record, save_attempts
from postbackproject import keys, shards
from postbackproject.queue import get_connection
from tests.conftest import Reply, deliver_everything, ingest_json

pytestmark = pytest.mark.django_db(transaction=True)


def rollup_counts() -> dict[tuple[str, str, str], int]:
    rows = DeliveryRollup.objects.values_list("host", "outcome", "code_class").annotate(n=Sum("attempts"))
    return {(host, outcome, klass): n for host, outcome, klass, n in rows}


def attempt_counts() -> dict[tuple[str, str, str], int]:
    counts: dict[tuple[str, str, str], int] = {}
    for host, outcome, code, n in DeliveryAttempt.objects.values_list("host", "outcome", "response_code").annotate(
        n=Count("id")
    ):
        key = (host, outcome, rollups.code_class(code))
        counts[key] = counts.get(key, 0) + n
    return counts


def test_rollups_add_up_to_the_attempts_they_summarise(client, receiver):
    DeliverySettings(backoff_base_seconds=0, max_attempts=2).save()
    receiver.answer(Reply(503), Reply(404), Reply(500), Reply(500))
    document = {"endpoint": {"method": "GET", "url": receiver.url("/r?n={n}")}, "data": [{"n": n} for n in range(6)]}
    ingest_json(client, document)

    deliver_everything()

    host = f"127.0.0.1:{receiver.port}"
    assert rollup_counts() == attempt_counts()
    total = sum(attempt_counts().values())
    for span in Span:
        assert DeliverySeries.objects.filter(span=span, host=ALL_HOSTS).aggregate(n=Sum("attempts"))["n"] == total
    assert DeliverySeries.objects.filter(span=Span.HOUR, host=host).aggregate(n=Sum("attempts"))["n"] == total
    assert rollup_counts()[(host, "success", "2xx")] >= 3
    assert rollup_counts()[(host, "failed", "4xx")] == 1
    latency = DeliveryRollup.objects.aggregate(s=Sum("latency_ms_sum"))["s"]
    assert latency == pytest.approx(DeliveryAttempt.objects.aggregate(s=Sum("response_time_ms"))["s"])


def attempt(postback_id: str, host: str, when: datetime, code: int | None = 200, ms: float | None = 42.0) -> Record:
    outcome = "success" if code and code < 300 else "failed"
    return Record(
        postback_id=postback_id,
        attempt=1,
        method="GET",
        url=f"http://{host}/",
        host=host,
        request_body="",
        delivered_at=when,
        response_code=code,
        response_time_ms=ms,
        response_body="",
        error="",
        outcome=outcome,
    )


def series(span: int, host: str) -> dict[tuple[datetime, str, str], tuple[int, int]]:
    rows = DeliverySeries.objects.filter(span=span, host=host)
    return {(r.start, r.outcome, r.code_class): (r.attempts, r.le_50ms) for r in rows}


def test_the_series_sum_all_hosts_per_minute_and_each_host_per_hour():
    save_attempts(
        [
            attempt("a", "a.example", datetime(2026, 11, 29, 12, 30, 1, tzinfo=UTC)),
            attempt("b", "b.example", datetime(2026, 11, 29, 12, 30, 59, tzinfo=UTC)),
            attempt("c", "a.example", datetime(2026, 11, 29, 12, 59, 59, tzinfo=UTC), code=503, ms=400),
            attempt("d", "a.example", datetime(2026, 11, 29, 13, 0, 0, tzinfo=UTC)),
        ]
    )
    save_attempts([attempt("a", "a.example", datetime(2026, 11, 29, 12, 30, 1, tzinfo=UTC))])  # a rerun

    noon, one = datetime(2026, 11, 29, 12, tzinfo=UTC), datetime(2026, 11, 29, 13, tzinfo=UTC)
    half_past = datetime(2026, 11, 29, 12, 30, tzinfo=UTC)
    assert series(Span.MINUTE, ALL_HOSTS) == {
        (half_past, "success", "2xx"): (2, 2),
        (datetime(2026, 11, 29, 12, 59, tzinfo=UTC), "failed", "5xx"): (1, 0),
        (one, "success", "2xx"): (1, 1),
    }
    assert series(Span.HOUR, "a.example") == {
        (noon, "success", "2xx"): (1, 1),
        (noon, "failed", "5xx"): (1, 0),
        (one, "success", "2xx"): (1, 1),
    }
    assert series(Span.HOUR, ALL_HOSTS)[(noon, "success", "2xx")] == (2, 2)
    assert not DeliverySeries.objects.filter(span=Span.MINUTE).exclude(host=ALL_HOSTS).exists()


def test_each_rollup_keeps_the_longest_latency_of_its_attempts_across_writes():
    when = datetime(2026, 11, 29, 12, 30, 1, tzinfo=UTC)
    save_attempts([attempt("a", "a.example", when, ms=40.0), attempt("b", "a.example", when, ms=1027.0)])
    save_attempts([attempt("c", "a.example", when, ms=300.0), attempt("d", "b.example", when, ms=2000.0)])

    assert DeliveryRollup.objects.get(host="a.example").latency_ms_max == 1027.0
    assert DeliverySeries.objects.get(span=Span.HOUR, host="a.example").latency_ms_max == 1027.0
    assert DeliverySeries.objects.get(span=Span.MINUTE, host=ALL_HOSTS).latency_ms_max == 2000.0
    assert DeliverySeries.objects.get(span=Span.HOUR, host=ALL_HOSTS).latency_ms_max == 2000.0


def test_a_try_recorded_twice_is_counted_once():
    row = Record(
        postback_id="p-0",
        attempt=1,
        method="GET",
        url="http://h.example/",
        host="h.example",
        request_body="",
        delivered_at=datetime(2026, 11, 29, 12, 30, 42, tzinfo=UTC),
        response_code=200,
        response_time_ms=42.0,
        response_body="",
        error="",
        outcome="success",
    )
    save_attempts([row])
    save_attempts([row])

    [rollup] = DeliveryRollup.objects.all()
    assert (rollup.minute, rollup.host, rollup.attempts, rollup.le_50ms) == (
        datetime(2026, 11, 29, 12, 30, tzinfo=UTC),
        "h.example",
        1,
        1,
    )


@pytest.mark.parametrize(
    ("latency", "bucket"),
    [(0.5, "le_5ms"), (5.0, "le_5ms"), (5.1, "le_10ms"), (999.0, "le_1000ms"), (45000, "over_30000ms")],
)
def test_latencies_land_in_their_histogram_bucket(latency, bucket):
    tally = rollups.Tally()
    tally.add(latency)
    assert tally.buckets[LATENCY_BUCKETS.index(bucket)] == 1


def accepted_in_redis() -> dict[int, int]:
    return {int(k): int(v) for k, v in get_connection().hgetall(keys.ACCEPTED).items()}


def test_ingestion_counts_accepted_postbacks_per_minute_in_redis(client):
    ingest_json(client, {"endpoint": {"method": "GET", "url": "http://h/"}, "data": [{}, {}, {}]})
    ingest_json(client, {"endpoint": {"method": "GET", "url": "http://h/"}, "data": [{}]})

    [(minute, count)] = accepted_in_redis().items()
    assert count == 4
    assert minute % 60 == 0 and abs(minute - time.time()) < 120


def test_past_minutes_are_folded_into_the_database_once():
    last_minute = int(time.time() // 60 * 60) - 60
    get_connection().hset(keys.ACCEPTED, mapping={last_minute: 7, last_minute - 60: 3, last_minute + 60: 5})

    assert rollups.fold_accepted() == 10
    assert rollups.fold_accepted() == 0

    folded = {row.minute.timestamp(): row.postbacks for row in AcceptedRollup.objects.all()}
    assert folded == {last_minute: 7, last_minute - 60: 3}
    assert accepted_in_redis() == {last_minute + 60: 5}  # the current minute is still counting


def test_a_fold_left_staged_by_a_crash_is_finished_once():
    staged = shards.MAIN.folding("token-a")
    get_connection().hset(staged, mapping={1_800_000_000: 4})
    done_before = shards.MAIN.folding("token-b")  # reached the database, then the folder died
    get_connection().hset(done_before, mapping={1_800_000_000: 9})
    RollupFold.objects.create(token="token-b")

    assert rollups.fold_accepted() == 4

    assert AcceptedRollup.objects.get().postbacks == 4
    assert not get_connection().exists(staged, done_before)
