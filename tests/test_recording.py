"""Recording never loses a batch: text the database refuses is escaped, one bad row never
costs the others their records."""

import dataclasses
import json
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from delivery.models import DeliveryAttempt, DeliverySettings, PostbackRequest
from delivery.recording import Record, save_attempts, storable
from delivery.settling import SETTLE_BATCH
from tests.conftest import Reply, ingest_json, run_worker
from tests.test_senders import issue

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("plain", "plain"),
        ("é and 日本", "é and 日本"),
        ("a\x00b", "a\\x00b"),
        ("lone \udc80 surrogate", "lone \\udc80 surrogate"),
        ("\x00\ud800", "\\x00\\ud800"),
    ],
)
def test_storable_escapes_only_what_databases_refuse(text, stored):
    assert storable(text) == stored


def test_a_reply_with_nul_bytes_is_stored_escaped_beside_the_rest_of_its_batch(client, receiver):
    """PostgreSQL refuses NUL in text: unescaped, this reply cost the whole batch its rows."""
    DeliverySettings(store_response_body="all").save()
    receiver.answer(Reply(body=b"before\x00after"), Reply(), Reply())
    document = {"endpoint": {"method": "GET", "url": receiver.url("/n?i={i}")}, "data": [{"i": i} for i in range(3)]}
    ids = ingest_json(client, document).json()["postbacks"]

    run_worker()

    rows = DeliveryAttempt.objects.filter(postback_id__in=ids)
    assert sorted(row.outcome for row in rows) == ["success"] * 3
    assert {row.response_body for row in rows} == {"before\\x00after", "ok"}
    assert len(receiver.requests) == 3


def test_a_body_in_a_declared_charset_is_stored_as_text(client, receiver):
    DeliverySettings(store_response_body="all").save()
    receiver.answer(Reply(body="déjà".encode("latin-1"), headers={"Content-Type": "text/plain; charset=latin-1"}))
    ingest_json(client, {"endpoint": {"method": "GET", "url": receiver.url("/c")}, "data": [{}]})

    run_worker()

    assert DeliveryAttempt.objects.get().response_body == "déjà"


BODIES = {"success": "fine", "retry": "busy", "failed": "no such thing"}


@pytest.mark.parametrize(
    ("policy", "stored"),
    [
        ("all", BODIES),
        ("failures", {**BODIES, "success": ""}),
        ("none", {"success": "", "retry": "", "failed": ""}),
    ],
)
def test_attempt_rows_keep_response_bodies_as_the_policy_says_and_log_lines_keep_every_one(
    client, receiver, caplog, policy, stored
):
    DeliverySettings(store_response_body=policy).save()
    with caplog.at_level("INFO", logger="delivery.attempts"):
        for status, body in [(200, b"fine"), (503, b"busy"), (404, b"no such thing")]:
            receiver.answer(Reply(status, body))
            ingest_json(client, {"endpoint": {"method": "GET", "url": receiver.url("/b")}, "data": [{}]})
            run_worker()

    assert dict(DeliveryAttempt.objects.values_list("outcome", "response_body")) == stored
    lines = [
        json.loads(line)
        for r in caplog.records
        if r.name == "delivery.attempts"
        for line in r.getMessage().splitlines()
    ]
    assert {line["outcome"]: line["response_body"] for line in lines} == BODIES


def test_failures_keep_their_bodies_by_default(client, receiver):
    receiver.answer(Reply(200, b"fine"), Reply(404, b"no such thing"))
    for n in range(2):
        ingest_json(client, {"endpoint": {"method": "GET", "url": receiver.url(f"/d{n}")}, "data": [{}]})
        run_worker()

    assert dict(DeliveryAttempt.objects.values_list("outcome", "response_body")) == {
        "success": "",
        "failed": "no such thing",
    }


def row(postback_id: str, code: int | None = 200) -> Record:
    return Record(
        postback_id=postback_id,
        attempt=1,
        method="GET",
        url="http://h/",
        host="h",
        request_body="",
        delivered_at=timezone.now(),
        response_code=code,
        response_time_ms=1.0,
        response_body="ok",
        error="",
        outcome="success",
    )


def test_one_row_the_database_refuses_does_not_cost_the_others_theirs(caplog):
    save_attempts([row("good-1"), row("refused", code=-1), row("good-2")])  # -1 breaks a CHECK

    assert set(DeliveryAttempt.objects.values_list("postback_id", flat=True)) == {"good-1", "good-2"}
    if connection.vendor == "postgresql":  # SQLite's INSERT OR IGNORE skips such a row silently
        assert "refused try 1 could not be recorded" in caplog.text


def test_a_workers_batch_of_attempts_is_written_with_one_insert_per_table():
    rows = [dataclasses.replace(row(f"p{n}"), host=f"h{n % 20}.example") for n in range(SETTLE_BATCH)]

    with CaptureQueriesContext(connection) as queries:
        save_attempts(rows)

    inserts = [query["sql"].split()[2].strip('"') for query in queries if query["sql"].startswith("INSERT")]
    assert inserts == [
        "delivery_postbackrequest",
        "delivery_deliveryattempt",
        "delivery_deliveryrollup",
        "delivery_deliveryseries",
    ]
    assert DeliveryAttempt.objects.count() == PostbackRequest.objects.count() == SETTLE_BATCH


def test_recording_the_same_try_twice_keeps_one_row():
    save_attempts([row("once")])
    save_attempts([row("once")])

    assert DeliveryAttempt.objects.filter(postback_id="once").count() == 1


def test_a_record_has_every_column_of_an_attempt_row_and_of_its_request_row_but_their_ids():
    def columns(model: Any) -> set[str]:
        return {field.column for field in model._meta.concrete_fields if not field.primary_key}

    recorded = {field.name for field in dataclasses.fields(Record)}
    assert columns(DeliveryAttempt) | (columns(PostbackRequest) - {"first_at"}) == recorded


def test_a_postback_tried_three_times_stores_its_request_once():
    first = dataclasses.replace(row("thrice"), method="POST", url="http://h/x?a=1", request_body='{"a":1}')
    tries = [
        dataclasses.replace(first, attempt=n, outcome=outcome, delivered_at=first.delivered_at + timedelta(minutes=n))
        for n, outcome in [(1, "retry"), (2, "retry"), (3, "success")]
    ]
    for item in tries:
        save_attempts([item])

    assert DeliveryAttempt.objects.filter(postback_id="thrice").count() == 3
    [sent] = PostbackRequest.objects.filter(postback_id="thrice")
    assert (sent.method, sent.url, sent.host, sent.request_body) == ("POST", "http://h/x?a=1", "h", '{"a":1}')
    assert sent.first_at == tries[0].delivered_at


def test_a_try_long_after_its_request_was_stored_stores_it_again_and_the_newest_is_read():
    first = row("replayed")
    later = dataclasses.replace(first, attempt=2, delivered_at=first.delivered_at + timedelta(days=20))
    save_attempts([first])
    save_attempts([later])

    assert PostbackRequest.objects.filter(postback_id="replayed").count() == 2
    assert PostbackRequest.of(["replayed"])["replayed"].first_at == later.delivered_at


def test_a_try_twice_in_one_batch_keeps_one_row_and_counts_once():
    written = save_attempts([row("twice"), row("twice"), row("other")])

    assert sorted(record.postback_id for record in written) == ["other", "twice"]
    assert DeliveryAttempt.objects.filter(postback_id="twice").count() == 1


def test_a_try_deferred_again_a_day_later_keeps_its_first_row():
    first = dataclasses.replace(row("deferred", code=None), outcome="deferred", response_time_ms=None)
    again = dataclasses.replace(first, delivered_at=first.delivered_at + timedelta(days=1))
    save_attempts([first])

    assert save_attempts([again]) == []
    assert list(DeliveryAttempt.objects.filter(postback_id="deferred").values_list("delivered_at", flat=True)) == [
        first.delivered_at
    ]


def test_the_sender_of_a_request_is_recorded_with_its_postbacks(client, receiver):
    key, plain = issue("test sender")
    document = {"endpoint": {"method": "GET", "url": receiver.url("/s")}, "data": [{}]}
    body = json.dumps(document).encode()
    keyed = client.generic("POST", "/i", body, HTTP_AUTHORIZATION=f"Bearer {plain}").json()["postbacks"]
    anonymous = ingest_json(client, document).json()["postbacks"]
    run_worker()

    sent = PostbackRequest.of([*keyed, *anonymous])
    assert sent[keyed[0]].sender == f"key {key.pk}"
    assert sent[anonymous[0]].sender == "127.0.0.1"
