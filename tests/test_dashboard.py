"""The dashboard's JSON endpoints against known attempts: what each chart and table says."""

import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import User

from dashboard import ranges
from delivery.models import LATENCY_BOUNDS_MS
from delivery.recording import Record, save_attempts
from postbackproject import keys
from postbackproject.queue import get_connection

pytestmark = pytest.mark.django_db

API = ["volume", "success", "latency", "codes", "hosts", "failures", "live"]


@pytest.fixture(autouse=True)
def minute_rollups_kept(settings):
    """The tests' fixed dates stay drawn by the minute, however long ago they are."""
    settings.MINUTE_ROLLUP_RETENTION_DAYS = 100_000


@pytest.fixture
def analyst(client):
    client.force_login(User.objects.create_user("analyst", password="a-long-test-password"))
    return client


def attempt(
    when: datetime,
    host: str = "a.example",
    code: int | None = 200,
    ms: float | None = 20.0,
    outcome: str | None = None,
    postback: str | None = None,
    error: str = "",
) -> Record:
    if outcome is None:
        outcome = "success" if code is not None and code < 300 else "failed"
    return Record(
        postback_id=postback or f"{host}-{when.timestamp()}-{code}-{outcome}",
        attempt=1,
        method="GET",
        url=f"http://{host}/x",
        host=host,
        request_body="",
        delivered_at=when,
        response_code=code,
        response_time_ms=ms,
        response_body="",
        error=error,
        outcome=outcome,
    )


def get(client, name: str, **params: str) -> Any:
    response = client.get(f"/dashboard/api/{name}", params)
    assert response.status_code == 200, response.content
    return response.json()


def custom(client, name: str, start: str, end: str, **params: str) -> Any:
    return get(client, name, range="custom", start=start, end=end, **params)


def series(body: dict[str, Any], key: str) -> list[Any]:
    return next(item["data"] for item in body["series"] if item["key"] == key)


@pytest.mark.parametrize("name", API)
def test_every_endpoint_needs_a_login(client, name):
    response = client.get(f"/dashboard/api/{name}")
    assert response.status_code == 302
    assert "/login/" in response["Location"]


def test_the_overview_page_is_a_shell_with_no_inline_script_or_style(analyst):
    page = analyst.get("/dashboard/").content.decode()
    assert 'src="/static/vendor/chartjs/chart.umd.min.js"' in page
    assert 'src="/static/dashboard/dashboard.js"' in page
    assert "<script>" not in page and "<style" not in page and "style=" not in page
    assert "onclick" not in page.lower()


def test_an_empty_range_has_every_bucket_and_nothing_in_them(analyst):
    body = get(analyst, "volume", range="1h")
    assert len(body["labels"]) == 60
    assert body["totals"] == {"accepted": 0, "success": 0, "retry": 0, "failed": 0, "deferred": 0}
    assert series(get(analyst, "success", range="1h"), "attempts") == [None] * 60
    assert get(analyst, "latency", range="1h")["totals"]["p95"] is None
    assert get(analyst, "hosts", range="1h")["hosts"] == []
    assert get(analyst, "failures", range="1h")["latest"] == []


@pytest.mark.parametrize(("name", "buckets"), [("1h", 60), ("24h", 96), ("7d", 168)])
def test_the_ranges_end_with_the_bucket_holding_now(name, buckets):
    now = datetime(2026, 11, 29, 12, 34, 56, tzinfo=UTC)
    window = ranges.window_from({"range": name}, now)
    assert len(window.edges) == buckets + 1
    assert window.start < now < window.end
    assert window.end - now <= timedelta(seconds=window.bucket)


def test_volume_counts_each_outcome_in_its_bucket_and_reruns_count_once(analyst):
    rows = [
        attempt(datetime(2026, 11, 29, 10, 0, 5, tzinfo=UTC)),
        attempt(datetime(2026, 11, 29, 10, 0, 59, tzinfo=UTC), code=503, outcome="retry"),
        attempt(datetime(2026, 11, 29, 10, 7, tzinfo=UTC), code=404),
        attempt(datetime(2026, 11, 29, 10, 7, 30, tzinfo=UTC), code=None, ms=None, outcome="deferred"),
    ]
    save_attempts(rows)
    save_attempts(rows)  # a drainer that died after writing: the same tries again

    body = custom(analyst, "volume", "2026-11-29T10:00Z", "2026-11-29T10:10Z")
    assert body["labels"][:2] == ["10:00:00", "10:01:00"]
    assert series(body, "success")[0] == 1 and series(body, "retry")[0] == 1
    assert series(body, "failed")[7] == 1 and series(body, "deferred")[7] == 1
    assert body["totals"] == {"accepted": 0, "success": 1, "retry": 1, "failed": 1, "deferred": 1}
    codes = custom(analyst, "codes", "2026-11-29T10:00Z", "2026-11-29T10:10Z")
    assert codes["totals"] == {"2xx": 1, "3xx": 0, "4xx": 1, "5xx": 1, "none": 0}  # deferred: not sent


def test_success_rates_count_sent_attempts_and_finished_postbacks(analyst):
    when = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    save_attempts(
        [
            attempt(when, postback="a"),
            attempt(when, postback="b", code=500, outcome="retry"),
            attempt(when, postback="c", code=404),
            attempt(when, postback="d"),
        ]
    )
    body = custom(analyst, "success", "2026-11-29T10:00Z", "2026-11-29T10:05Z")
    assert body["totals"] == {"attempts": 50.0, "postbacks": pytest.approx(66.67)}
    assert series(body, "attempts")[0] == 50.0


def test_latency_percentiles_come_from_the_histogram_buckets(analyst):
    when = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    # 90 answers in 5 ms or less, 10 between 250 and 500 ms.
    rows = [attempt(when, ms=3.0, postback=f"f{i}") for i in range(90)]
    rows += [attempt(when, ms=400.0, postback=f"s{i}") for i in range(10)]
    save_attempts(rows)

    totals = custom(analyst, "latency", "2026-11-29T10:00Z", "2026-11-29T10:05Z")["totals"]
    assert 0 < totals["p50"] <= 5
    assert 250 < totals["p95"] <= 500
    assert 250 < totals["p99"] <= 500
    assert totals["mean"] == pytest.approx((90 * 3 + 10 * 400) / 100)


def exact_percentile(latencies: list[float], fraction: float) -> float:
    """The nearest-rank percentile of the latencies themselves."""
    ordered = sorted(latencies)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def tolerance(exact: float, slowest: float) -> float:
    """How far a histogram's percentile may be from the exact one: the width of the bucket
    holding the exact one, cut at the slowest latency."""
    lower = max((bound for bound in LATENCY_BOUNDS_MS if bound < exact), default=0)
    upper = min((bound for bound in LATENCY_BOUNDS_MS if bound >= exact), default=slowest)
    return min(upper, slowest) - lower


def assert_true_percentile(reported: float, latencies: list[float], fraction: float) -> None:
    exact, slowest = exact_percentile(latencies, fraction), max(latencies)
    assert reported <= slowest
    assert abs(reported - exact) <= tolerance(exact, slowest), (fraction, reported, exact)


@pytest.mark.parametrize(
    ("start", "end", "host"),
    [
        ("2026-11-29T10:00Z", "2026-11-29T10:05Z", None),  # the all-hosts series, by the minute
        ("2026-11-29T10:00Z", "2026-11-29T10:05Z", "a.example"),  # the minute rollups
        ("2026-11-26T00:00Z", "2026-11-30T00:00Z", "a.example"),  # the hourly series
    ],
)
def test_latency_percentiles_never_exceed_the_slowest_attempt_and_stay_near_the_exact_ones(analyst, start, end, host):
    when = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    # A fast group, and a slow one at the bottom of the wide 1-2.5 s bucket: 1,027 ms at most.
    latencies = [120.0 + 2.5 * i for i in range(40)] + [1000.5 + 0.4 * i for i in range(59)] + [1027.0]
    save_attempts(
        [attempt(when + timedelta(seconds=1.1 * i), ms=ms, postback=f"p{i}") for i, ms in enumerate(latencies)]
    )
    params = {"host": host} if host else {}

    body = custom(analyst, "latency", start, end, **params)
    for key, fraction in [("p50", 0.50), ("p95", 0.95), ("p99", 0.99)]:
        assert_true_percentile(body["totals"][key], latencies, fraction)
        if body["window"]["bucket_seconds"] == 60:  # each minute against its own attempts
            assert_true_percentile(series(body, key)[0], latencies[:55], fraction)  # 0 to 59.4 s
            assert_true_percentile(series(body, key)[1], latencies[55:], fraction)
    [row] = custom(analyst, "hosts", start, end)["hosts"]
    assert_true_percentile(row["p95_ms"], latencies, 0.95)


def test_a_range_across_midnight_keeps_each_attempt_in_its_local_bucket(analyst, settings):
    settings.TIME_ZONE = "America/New_York"
    zone = ZoneInfo("America/New_York")
    before = datetime(2026, 11, 28, 23, 59, 30, tzinfo=zone)
    after = datetime(2026, 11, 29, 0, 0, 30, tzinfo=zone)
    save_attempts([attempt(before), attempt(after, code=404)])

    body = custom(analyst, "volume", "2026-11-28T23:00", "2026-11-29T01:00")  # local times
    assert body["window"]["start"] == "2026-11-28T23:00:00-05:00"
    at = body["labels"].index("23:59:00")
    assert body["labels"][at + 1] == "00:00:00"
    assert series(body, "success")[at] == 1 and series(body, "failed")[at + 1] == 1
    assert body["starts"][at + 1] == "2026-11-29T00:00:00-05:00"


def test_day_buckets_follow_the_local_day_across_a_dst_change(analyst, settings):
    settings.TIME_ZONE = "Europe/Paris"  # 29 March 2026: clocks go from 02:00 to 03:00
    zone = ZoneInfo("Europe/Paris")
    save_attempts(
        [
            attempt(datetime(2026, 3, 28, 23, 30, tzinfo=zone)),  # 22:30 UTC on the 28th
            attempt(datetime(2026, 3, 29, 0, 30, tzinfo=zone)),  # 23:30 UTC on the 28th
            attempt(datetime(2026, 3, 29, 23, 30, tzinfo=zone)),  # 21:30 UTC on the 29th
            attempt(datetime(2026, 3, 30, 0, 30, tzinfo=zone)),
        ]
    )

    body = custom(analyst, "volume", "2026-03-25T00:00", "2026-04-04T00:00")
    assert body["window"]["bucket_seconds"] == ranges.DAY
    days = dict(zip(body["starts"], series(body, "success"), strict=True))
    assert days["2026-03-28T00:00:00+01:00"] == 1
    assert days["2026-03-29T00:00:00+01:00"] == 2  # a day of 23 hours
    assert days["2026-03-30T00:00:00+02:00"] == 1
    assert sum(days.values()) == 4


def test_hour_buckets_skip_the_hour_that_does_not_exist(analyst, settings):
    settings.TIME_ZONE = "Europe/Paris"
    save_attempts([attempt(datetime(2026, 3, 29, 1, 30, tzinfo=UTC))])  # 03:30 CEST

    body = custom(analyst, "volume", "2026-03-28T22:00", "2026-03-29T22:00")
    assert body["window"]["bucket_seconds"] == 900
    hours = [label for label in body["labels"] if label.endswith(":00:00")]
    assert hours[:6] == ["22:00:00", "23:00:00", "00:00:00", "01:00:00", "03:00:00", "04:00:00"]
    assert series(body, "success")[body["labels"].index("03:30:00")] == 1


def test_the_host_table_sums_whole_hours_and_the_minutes_around_them(analyst):
    save_attempts(
        [
            attempt(datetime(2026, 11, 29, 10, 45, tzinfo=UTC), host="a.example"),
            attempt(datetime(2026, 11, 29, 11, 30, tzinfo=UTC), host="a.example", code=500, outcome="retry"),
            attempt(datetime(2026, 11, 29, 13, 10, tzinfo=UTC), host="a.example"),
            attempt(datetime(2026, 11, 29, 13, 40, tzinfo=UTC), host="a.example"),  # after the range
            attempt(datetime(2026, 11, 29, 10, 20, tzinfo=UTC), host="b.example"),  # before it
            attempt(datetime(2026, 11, 29, 12, 0, tzinfo=UTC), host="b.example", code=404),
        ]
    )

    body = custom(analyst, "hosts", "2026-11-29T10:30Z", "2026-11-29T13:30Z")
    rows = {row["host"]: row for row in body["hosts"]}
    assert [row["host"] for row in body["hosts"]] == ["a.example", "b.example"]
    assert (rows["a.example"]["attempts"], rows["a.example"]["delivered"], rows["a.example"]["retried"]) == (3, 2, 1)
    assert rows["b.example"]["failed"] == 1 and rows["b.example"]["success_rate"] == 0.0
    assert rows["a.example"]["circuit"] == {"state": "closed"}


def test_the_host_table_shows_open_circuits(analyst):
    save_attempts([attempt(datetime.now(UTC) - timedelta(minutes=5), host="down.example", code=None, ms=5.0)])
    redis = get_connection()
    until = (time.time() + 60) * 1000
    redis.zadd(keys.CIRCUITS_OPEN, {"down.example": until, "quiet.example": until})
    redis.hset(keys.CIRCUITS_FAILURES, "down.example", 7)

    rows = {row["host"]: row for row in get(analyst, "hosts", range="1h")["hosts"]}
    assert rows["down.example"]["circuit"]["state"] == "open"
    assert rows["down.example"]["circuit"]["failures"] == 7
    assert rows["quiet.example"]["attempts"] == 0  # open, and nothing sent in the range


def test_one_hosts_charts_count_only_that_host(analyst):
    when = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    save_attempts([attempt(when, host="a.example"), attempt(when, host="b.example", code=404)])

    for start, end in [("2026-11-29T10:00Z", "2026-11-29T11:00Z"), ("2026-11-20T00:00Z", "2026-11-30T00:00Z")]:
        body = custom(analyst, "volume", start, end, host="b.example")
        assert body["totals"] == {"success": 0, "retry": 0, "failed": 1, "deferred": 0}  # no "accepted"


def test_failures_say_why_newest_first(analyst):
    start = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    rows = [
        attempt(start + timedelta(minutes=1), code=503, outcome="retry", postback="p1"),
        attempt(
            start + timedelta(minutes=2), code=None, ms=5.0, outcome="retry", error="connect timeout", postback="p2"
        ),
        attempt(start + timedelta(minutes=3), code=503, outcome="failed", postback="p3"),
        attempt(start + timedelta(minutes=4), host="b.example", code=404, postback="p4"),
    ]
    rows[0].response_body = "maintenance\nback soon"
    save_attempts(rows)

    body = custom(analyst, "failures", "2026-11-29T10:00Z", "2026-11-29T11:00Z", host="a.example")
    assert [row["postback_id"] for row in body["latest"]] == ["p3", "p2", "p1"]
    reasons = {row["reason"]: row["attempts"] for row in body["reasons"]}
    assert reasons == {"HTTP 503: maintenance back soon": 1, "HTTP 503": 1, "connect timeout": 1}
    assert "host=a.example" in body["replay_url"] and "since=2026-11-29T10%3A00" in body["replay_url"]


def test_accepted_postbacks_include_the_minutes_not_yet_folded(analyst):
    this_minute = int(time.time() // 60 * 60)
    get_connection().hset(keys.ACCEPTED, mapping={this_minute: 5, this_minute - 120: 2})

    body = get(analyst, "volume", range="1h")
    assert body["totals"]["accepted"] == 7
    assert series(body, "accepted")[-1] == 5
    assert get(analyst, "live")["accepted_this_minute"] == 5


def test_live_figures_come_from_redis(analyst):
    live = get(analyst, "live")
    assert live == {
        "inbox_entries": 0,
        "in_delivery": 0,
        "scheduled_tries": 0,
        "failed_jobs": 0,
        "workers": 0,
        "accepted_this_minute": 0,
        "open_circuits": 0,
        "probe_due_circuits": 0,
    }


def test_circuits_whose_open_time_has_passed_are_probe_due_in_live_figures_and_the_host_table(analyst):
    redis = get_connection()
    seconds, micros = redis.time()
    now_ms = seconds * 1000 + micros // 1000
    redis.zadd(keys.CIRCUITS_OPEN, {"back.example": now_ms - 1000, "down.example": now_ms + 60_000})

    live = get(analyst, "live")
    assert (live["open_circuits"], live["probe_due_circuits"]) == (1, 1)
    rows = {row["host"]: row for row in get(analyst, "hosts", range="1h")["hosts"]}
    assert rows["back.example"]["circuit"]["state"] == "probe_due"
    assert rows["down.example"]["circuit"]["state"] == "open"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"range": "2y"}, "unknown range"),
        ({"range": "custom", "start": "yesterday", "end": "2026-11-29T10:00"}, "start"),
        ({"range": "custom", "start": "2026-11-29T10:00", "end": "2026-11-29T09:00"}, "end after"),
        ({"range": "custom", "start": "2025-01-01T00:00", "end": "2026-01-01T00:00"}, "at most 92 days"),
    ],
)
def test_a_range_it_cannot_show_is_a_400_that_says_why(analyst, params, message):
    response = analyst.get("/dashboard/api/volume", params)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_range_older_than_the_minute_rollups_goes_by_the_hour(settings):
    settings.MINUTE_ROLLUP_RETENTION_DAYS = 35
    now = datetime(2026, 11, 29, 12, tzinfo=UTC)
    old = ranges.window_from({"range": "custom", "start": "2026-09-01T10:00Z", "end": "2026-09-01T11:00Z"}, now)
    recent = ranges.window_from({"range": "custom", "start": "2026-11-28T10:00Z", "end": "2026-11-28T11:00Z"}, now)
    assert (old.bucket, recent.bucket) == (3600, 60)
