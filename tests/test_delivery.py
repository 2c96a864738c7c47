"""End to end: ingest over HTTP, the real worker delivers to a real receiver, attempts recorded."""

import json
import threading
import time

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection
from django_rq.workers import get_worker_class

from delivery.models import DeliveryAttempt, DeliverySettings
from delivery.worker import DeliveryWorker
from postbackproject.queue import get_queue
from tests.conftest import (
    Reply,
    deliver_everything,
    ingest_json,
    release_scheduled,
    run_worker,
    scheduled_retries,
    sent_url,
)

pytestmark = pytest.mark.django_db(transaction=True)


def endpoint(receiver, template: str, method: str = "GET") -> dict[str, str]:
    return {"method": method, "url": receiver.url(template)}


def no_waits(**overrides: object) -> None:
    """Retry at once (the suite checks waits by reading the schedule, never by sleeping)."""
    DeliverySettings(**{"backoff_base_seconds": 0, **overrides}).save()


def attempts_of(postback_id: str) -> list[DeliveryAttempt]:
    return list(DeliveryAttempt.objects.filter(postback_id=postback_id).order_by("attempt"))


@pytest.mark.parametrize("path", ["/ingest.php", "/i"])
def test_the_sample_is_delivered_byte_for_byte(client, receiver, path):
    document = {
        "endpoint": endpoint(receiver, "/data?key={key}&value={value}&foo={bar}"),
        "data": [{"key": "Azureus", "value": "Dendrobates"}, {"key": "Phyllobates", "value": "Terribilis"}],
    }
    ids = ingest_json(client, document, path).json()["postbacks"]

    run_worker()

    assert sorted(receiver.targets) == [
        "/data?key=Azureus&value=Dendrobates&foo=",
        "/data?key=Phyllobates&value=Terribilis&foo=",
    ]
    assert all(request.method == "GET" and request.body == b"" for request in receiver.requests)
    assert sorted(r.headers["X-Postback-Id"] for r in receiver.requests) == sorted(ids)
    [attempt] = attempts_of(ids[0])
    assert attempt.outcome == "success"
    assert attempt.response_code == 200
    assert attempt.response_body == ""  # by default only failures keep theirs
    assert sent_url(attempt.postback_id) == receiver.url("/data?key=Azureus&value=Dendrobates&foo=")
    assert attempt.response_time_ms is not None and attempt.response_time_ms >= 0


def test_the_later_sample_edition_is_percent_encoded(client, receiver):
    document = {
        "endpoint": endpoint(receiver, "/data?title={mascot}&image={location}&foo={bar}"),
        "data": [{"mascot": "Gopher", "location": "https://blog.golang.org/gopher/gopher.png"}],
    }
    ingest_json(client, document)
    run_worker()
    assert receiver.targets == ["/data?title=Gopher&image=https%3A%2F%2Fblog.golang.org%2Fgopher%2Fgopher.png&foo="]


def test_post_sends_the_data_object_as_json(client, receiver):
    url = receiver.url("/users/{user}/pay")
    data = '[{"user": "é", "amount": 1.50, "ok": true, "n": null}]'
    raw = f'{{"endpoint": {{"method": "POST", "url": "{url}"}}, "data": {data}}}'
    client.generic("POST", "/i", raw.encode())
    run_worker()

    [request] = receiver.requests
    assert request.method == "POST"
    assert request.target == "/users/%C3%A9/pay"
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == '{"user":"é","amount":1.50,"ok":true,"n":null}'.encode()


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_other_methods_are_delivered_with_or_without_a_body(client, receiver, method):
    ingest_json(client, {"endpoint": endpoint(receiver, "/x/{id}", method), "data": [{"id": 7}]})
    run_worker()
    [request] = receiver.requests
    assert (request.method, request.target) == (method, "/x/7")
    assert (request.body == b"") == (method == "DELETE")


def test_a_batch_is_delivered_concurrently(client, receiver):
    together = threading.Barrier(4)  # answers only when all four requests are in flight at once
    receiver.answer(*[Reply(200, barrier=together) for _ in range(4)])
    ingest_json(client, {"endpoint": endpoint(receiver, "/p?n={n}"), "data": [{"n": n} for n in range(4)]})

    run_worker()

    assert DeliveryAttempt.objects.filter(outcome="success").count() == 4


def test_connections_are_kept_alive_across_jobs(client, receiver):
    for n in range(3):
        ingest_json(client, {"endpoint": endpoint(receiver, f"/k{n}"), "data": [{}]})
        run_worker()  # a drain job each time

    assert len(receiver.requests) == 3
    assert len({request.client_port for request in receiver.requests}) == 1


def test_a_changed_default_reaches_a_running_worker(client, receiver):
    document = {"endpoint": endpoint(receiver, "/d?foo={bar}&n={n}"), "data": [{"n": None}]}
    ingest_json(client, document)
    run_worker()
    call_command("deliverysettings", "--set", "unmatched_default=none at all")
    ingest_json(client, document)
    run_worker()

    assert receiver.targets == ["/d?foo=&n=", "/d?foo=none%20at%20all&n=none%20at%20all"]


def test_it_retries_500s_with_the_same_id_until_success(client, receiver):
    no_waits()
    receiver.answer(Reply(500), Reply(503), Reply(200))
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/r"), "data": [{}]}).json()["postbacks"]

    deliver_everything()

    assert [r.headers["X-Postback-Id"] for r in receiver.requests] == [pid, pid, pid]
    assert [r.headers["X-Postback-Attempt"] for r in receiver.requests] == ["1", "2", "3"]
    assert [(a.attempt, a.response_code, a.outcome) for a in attempts_of(pid)] == [
        (1, 500, "retry"),
        (2, 503, "retry"),
        (3, 200, "success"),
    ]


def test_a_404_fails_at_once(client, receiver):
    receiver.answer(Reply(404, b"no such thing"))
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/x"), "data": [{}]}).json()["postbacks"]

    deliver_everything()

    [attempt] = attempts_of(pid)
    assert (attempt.response_code, attempt.outcome, attempt.response_body) == (404, "failed", "no such thing")
    assert len(receiver.requests) == 1


def test_redirects_are_not_followed(client, receiver):
    receiver.answer(Reply(302, headers={"Location": receiver.url("/elsewhere")}))
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/x"), "data": [{}]}).json()["postbacks"]
    deliver_everything()
    assert receiver.targets == ["/x"]
    assert attempts_of(pid)[0].outcome == "failed"


def test_only_the_failed_postbacks_of_a_batch_are_retried(client, receiver):
    no_waits()
    receiver.answer(Reply(200), Reply(500), Reply(200))
    document = {"endpoint": endpoint(receiver, "/b?n={n}"), "data": [{"n": 1}, {"n": 2}]}
    DeliverySettings(backoff_base_seconds=0, batch_size=100).save()
    ingest_json(client, document)

    deliver_everything()

    assert DeliveryAttempt.objects.filter(outcome="success").count() == 2
    assert len(receiver.requests) == 3  # one of the two was sent twice
    retried = DeliveryAttempt.objects.get(outcome="retry")
    assert DeliveryAttempt.objects.get(postback_id=retried.postback_id, attempt=2).outcome == "success"


def test_refused_connections_are_retried_then_fail(client, refused_url):
    no_waits(max_attempts=3)
    [pid] = ingest_json(client, {"endpoint": {"method": "GET", "url": refused_url}, "data": [{}]}).json()["postbacks"]

    deliver_everything()

    attempts = attempts_of(pid)
    assert [(a.attempt, a.outcome, a.response_code) for a in attempts] == [
        (1, "retry", None),
        (2, "retry", None),
        (3, "failed", None),
    ]
    assert "refused" in attempts[0].error.lower()


def test_a_reply_that_is_not_http_is_recorded_as_a_protocol_error_and_retried(client, receiver):
    receiver.answer(Reply(raw=b"garbage, no status line\r\n\r\n"))
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/garbled"), "data": [{}]}).json()["postbacks"]

    run_worker()

    [attempt] = attempts_of(pid)
    assert (attempt.outcome, attempt.response_code) == ("retry", None)
    assert attempt.error == "protocol error: the reply is not HTTP (Received HTTP/0.9 when not allowed)"
    [(retry, _)] = scheduled_retries()
    assert (retry.postback_id, retry.attempt) == (pid, 2)


def test_timeouts_are_retried(client, receiver):
    no_waits(read_timeout_seconds=0.2)
    receiver.answer(Reply(200, delay=1.0), Reply(200))
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/slow"), "data": [{}]}).json()["postbacks"]

    deliver_everything()

    first, second = attempts_of(pid)
    assert (first.outcome, first.error, first.response_code) == ("retry", "read timeout", None)
    assert second.outcome == "success"


@pytest.mark.parametrize("status", [408, 429, 502])
def test_transient_statuses_are_retried(client, receiver, status):
    no_waits()
    receiver.answer(Reply(status), Reply(200))
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/t"), "data": [{}]}).json()["postbacks"]
    deliver_everything()
    assert [a.outcome for a in attempts_of(pid)] == ["retry", "success"]


def test_retry_after_sets_the_next_try(client, receiver):
    no_waits()
    receiver.answer(Reply(429, headers={"Retry-After": "120"}))
    ingest_json(client, {"endpoint": endpoint(receiver, "/ra"), "data": [{}]})
    before = time.time()

    run_worker()

    [(retry, due)] = scheduled_retries()
    assert retry.attempt == 2
    assert before + 120 <= due <= time.time() + 120


def test_retry_after_is_capped_by_the_longest_backoff(client, receiver):
    no_waits(backoff_max_seconds=30)
    receiver.answer(Reply(503, headers={"Retry-After": "86400"}))
    ingest_json(client, {"endpoint": endpoint(receiver, "/ra"), "data": [{}]})
    run_worker()
    [(_, due)] = scheduled_retries()
    assert due <= time.time() + 30


def test_backoff_grows_exponentially(client, refused_url):
    DeliverySettings(backoff_base_seconds=10, backoff_factor=4, backoff_max_seconds=3600).save()
    ingest_json(client, {"endpoint": {"method": "GET", "url": refused_url}, "data": [{}]})
    waits = []
    for _ in range(3):
        started = time.time()
        run_worker()
        [(_, due)] = scheduled_retries()
        waits.append(due - started)
        release_scheduled()
    # 10, 40, 160 seconds, each jittered between half and all of its value
    for wait, full in zip(waits, [10, 40, 160], strict=True):
        assert full / 2 - 0.5 <= wait <= full + 0.5


def test_max_attempts_exhausted_fails_the_postback(client, receiver):
    no_waits(max_attempts=2)
    receiver.answer(Reply(500), Reply(500), Reply(200))
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/m"), "data": [{}]}).json()["postbacks"]

    deliver_everything()

    assert [(a.attempt, a.outcome) for a in attempts_of(pid)] == [(1, "retry"), (2, "failed")]
    assert len(receiver.requests) == 2
    assert not scheduled_retries() and get_queue().count == 0


def test_long_response_bodies_are_cut(client, receiver):
    DeliverySettings(response_body_max_bytes=10, store_response_body="all").save()
    receiver.answer(Reply(200, b"0123456789abcdefghij" * 1000))
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/big"), "data": [{}]}).json()["postbacks"]
    run_worker()
    assert attempts_of(pid)[0].response_body == "0123456789"


def test_short_replies_keep_the_connection_even_when_no_body_is_logged(client, receiver):
    DeliverySettings(response_body_max_bytes=0).save()
    for n in range(2):
        ingest_json(client, {"endpoint": endpoint(receiver, f"/n{n}"), "data": [{}]})
        run_worker()
    assert len({request.client_port for request in receiver.requests}) == 1
    assert set(DeliveryAttempt.objects.values_list("response_body", flat=True)) == {""}


def test_a_huge_reply_closes_the_connection_instead_of_being_read(client, receiver):
    receiver.answer(Reply(200, b"x" * 1_000_000), Reply(200))
    for n in range(2):
        ingest_json(client, {"endpoint": endpoint(receiver, f"/h{n}"), "data": [{}]})
    run_worker()
    first, second = receiver.requests
    assert first.client_port != second.client_port
    assert DeliveryAttempt.objects.filter(outcome="success").count() == 2


def test_each_attempt_is_one_json_log_line(client, receiver, caplog):
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/log"), "data": [{}]}).json()["postbacks"]
    with caplog.at_level("INFO", logger="delivery.attempts"):
        run_worker()
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "delivery.attempts"]
    assert line["postback_id"] == pid
    assert line["outcome"] == "success" and line["response_code"] == 200 and line["attempt"] == 1
    assert {"method", "url", "delivered_at", "response_time_ms", "response_body", "error"} <= line.keys()


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::ffff:127.0.0.1]",
        # IPv6 forms that carry 127.0.0.1 (compatible, SIIT, NAT64, 6to4), NAT64 local use, and
        # an IETF protocol assignment that Python 3.11.7 calls global.
        "[::127.0.0.1]",
        "[::ffff:0:127.0.0.1]",
        "[64:ff9b::127.0.0.1]",
        "[2002:7f00:1::1]",
        "[64:ff9b:1::7f00:1]",
        "192.0.0.8",
    ],
)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_private_addresses_are_refused_without_sending(client, receiver, settings, scheme, host):
    settings.DELIVERY_ALLOW_NETWORKS = []
    document = {"endpoint": {"method": "GET", "url": f"{scheme}://{host}:{receiver.port}/in"}, "data": [{}]}
    [pid] = ingest_json(client, document).json()["postbacks"]

    deliver_everything()

    [attempt] = attempts_of(pid)
    assert attempt.outcome == "failed"
    assert "is not public and not in DELIVERY_ALLOW_NETWORKS" in attempt.error
    assert receiver.requests == []


def test_the_worker_class_is_configured_for_rqworker():
    assert get_worker_class() is DeliveryWorker


def test_manage_py_rqworker_runs_jobs_with_the_json_serializer(client, receiver):
    """The production command, whose default --serializer is pickle, still reads our jobs."""
    ingest_json(client, {"endpoint": endpoint(receiver, "/cmd?k={k}"), "data": [{"k": "v"}]})

    call_command("rqworker", "postbacks", "--burst", "--with-scheduler", verbosity=0)

    assert receiver.targets == ["/cmd?k=v"]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs a database server whose session can be killed")
def test_a_worker_survives_a_database_restart(client, receiver):
    ingest_json(client, {"endpoint": endpoint(receiver, "/before"), "data": [{}]})
    run_worker()
    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid])
    [pid] = ingest_json(client, {"endpoint": endpoint(receiver, "/after"), "data": [{}]}).json()["postbacks"]

    run_worker()

    assert receiver.targets == ["/before", "/after"]
    assert DeliveryAttempt.objects.get(postback_id=pid).outcome == "success"
