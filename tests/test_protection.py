"""One receiver cannot hurt the others: a deadline per request, in-flight limits per host,
and circuit breakers shared by every worker."""

import json
import time
from collections import Counter

import pytest
from django.contrib.auth.models import Permission, User

from delivery import circuit
from delivery.models import DeliveryAttempt, DeliverySettings
from postbackproject import keys
from postbackproject.queue import get_connection
from tests.conftest import (
    Receiver,
    Reply,
    deliver_everything,
    ingest_json,
    release_scheduled,
    run_worker,
    scheduled_retries,
    success_ids,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)


def document(receiver: Receiver, count: int, path: str = "/p?n={n}") -> dict[str, object]:
    return {"endpoint": {"method": "GET", "url": receiver.url(path)}, "data": [{"n": n} for n in range(count)]}


def outcomes() -> list[str]:
    return list(DeliveryAttempt.objects.order_by("delivered_at", "id").values_list("outcome", flat=True))


# --- the deadline ----------------------------------------------------------------------------


def test_a_dripping_receiver_is_cut_off_at_the_total_deadline_and_retried(client, receiver):
    """A byte every 0.2 s never trips the read timeout (1 s between bytes); the total does."""
    DeliverySettings(read_timeout_seconds=1, total_timeout_seconds=1, backoff_base_seconds=0).save()
    receiver.answer(Reply(body=b"x" * 50, drip_every=0.2), Reply())
    [pid] = ingest_json(client, document(receiver, 1)).json()["postbacks"]

    deliver_everything()

    first, second = DeliveryAttempt.objects.filter(postback_id=pid).order_by("attempt")
    assert (first.outcome, first.response_code) == ("retry", None)
    assert first.error.startswith("total timeout")
    assert first.response_time_ms is not None and 1000 <= first.response_time_ms < 5000
    assert second.outcome == "success"


def test_a_receiver_that_never_answers_is_a_read_timeout(client, receiver):
    DeliverySettings(read_timeout_seconds=0.3, total_timeout_seconds=10, max_attempts=1).save()
    receiver.answer(Reply(delay=2))
    ingest_json(client, document(receiver, 1))

    run_worker()

    [attempt] = DeliveryAttempt.objects.all()
    assert (attempt.outcome, attempt.error) == ("failed", "read timeout")


# --- a host that stalls ------------------------------------------------------------------------


def test_a_stalled_host_never_holds_up_a_healthy_one(client, processes):
    """Two real workers; 300 postbacks to a host that drips its replies, then 20 to a healthy
    host: the healthy ones are all delivered while the stalled ones are still dripping."""
    DeliverySettings(total_timeout_seconds=60, read_timeout_seconds=30).save()
    stalled = Receiver(Reply(body=b"x" * 1000, drip_every=1.0))
    healthy = Receiver()
    try:
        for _ in range(2):
            processes.worker(DELIVERY_CONCURRENCY="32")
        for _ in range(3):
            ingest_json(client, document(stalled, 100))
        wait_until(lambda: len(stalled.requests) >= 8, timeout=30, what="the stalled host to be holding requests")
        ids = ingest_json(client, document(healthy, 20)).json()["postbacks"]

        wait_until(lambda: success_ids() >= set(ids), timeout=30, what="the healthy host's postbacks")

        assert not stalled.release.is_set()  # the stalled ones are still dripping...
        assert DeliveryAttempt.objects.filter(postback_id__in=ids).count() == 20
        assert len(stalled.requests) <= 2 * 8  # ...and hold no more than their earned share
    finally:
        stalled.close()
        healthy.close()


# --- circuits ------------------------------------------------------------------------------


def open_circuit_on(client, receiver: Receiver, failures: int = 3, postbacks: int = 6) -> list[str]:
    """A host that answers 503 until its circuit opens; returns the postback ids."""
    DeliverySettings(
        circuit_failure_threshold=failures, max_in_flight_per_host=1, backoff_base_seconds=0, circuit_open_seconds=30
    ).save()
    receiver.default = Reply(503)
    ids: list[str] = ingest_json(client, document(receiver, postbacks)).json()["postbacks"]
    run_worker()
    return ids


def test_a_circuit_opens_after_failures_in_a_row_and_defers_without_sending(client, receiver):
    ids = open_circuit_on(client, receiver)

    assert len(receiver.requests) == 3
    # Three failures; then the three never sent and the three retries (due at once) deferred.
    assert outcomes() == ["retry"] * 3 + ["deferred"] * 6
    deferred = DeliveryAttempt.objects.filter(outcome="deferred")
    assert all(f"circuit open for 127.0.0.1:{receiver.port}" in row.error for row in deferred)
    assert sorted(row.attempt for row in deferred) == [1, 1, 1, 2, 2, 2]  # deferring uses up no attempt
    [(host, until, failures, _)] = circuit.open_circuits()
    assert (host, failures) == (f"127.0.0.1:{receiver.port}", 3)
    assert 25 < until - time.time() <= 30
    waiting = {item.postback_id: (item.attempt, due) for item, due in scheduled_retries()}
    assert waiting.keys() == set(ids)
    assert all(due >= until for attempt, due in waiting.values() if attempt == 1)


def test_the_attempt_log_has_one_line_per_row_written_by_outcome_however_often_a_try_is_deferred(
    client, receiver, caplog
):
    with caplog.at_level("INFO", logger="delivery.attempts"):
        open_circuit_on(client, receiver)
        for _ in range(2):  # their time comes while the circuit is still open: deferred again
            release_scheduled()
            run_worker()
        receiver.default = Reply()
        circuit.close_circuits([f"127.0.0.1:{receiver.port}"])
        deliver_everything()

    lines = [
        json.loads(text)
        for record in caplog.records
        if record.name == "delivery.attempts"
        for text in record.getMessage().splitlines()
    ]
    logged = Counter((line["outcome"], line["postback_id"], line["attempt"]) for line in lines)
    rows = Counter(DeliveryAttempt.objects.values_list("outcome", "postback_id", "attempt"))
    assert logged == rows
    assert Counter(outcome for outcome, _, _ in rows.elements()) == {"retry": 3, "deferred": 6, "success": 6}


def test_a_flaky_host_failing_six_times_in_a_row_keeps_its_circuit_closed_by_default(client, receiver):
    # Six in a row happens to a receiver failing 30 % of its requests about once in 400
    # attempts: with the default threshold (10) its postbacks are retried, never all deferred.
    DeliverySettings(max_in_flight_per_host=1, backoff_base_seconds=0).save()
    receiver.answer(*[Reply(503)] * 6)
    ids = ingest_json(client, document(receiver, 7)).json()["postbacks"]

    run_worker()

    assert circuit.open_circuits() == []
    assert not DeliveryAttempt.objects.filter(outcome="deferred").exists()
    assert outcomes().count("retry") == 6
    assert success_ids() >= set(ids[6:])


def test_retries_that_come_due_while_the_circuit_is_open_are_deferred_again_without_a_request(client, receiver):
    open_circuit_on(client, receiver)
    release_scheduled()  # every try due now; the circuit stays open for 30 s

    run_worker()

    assert len(receiver.requests) == 3
    assert all(due > time.time() + 20 for _, due in scheduled_retries())


def end_open_period() -> None:
    """As if circuit_open_seconds had passed: the next look at the host sends a probe."""
    connection = get_connection()
    hosts: list[bytes] = connection.zrange(keys.CIRCUITS_OPEN, 0, -1)  # type: ignore[assignment]
    seconds, microseconds = connection.time()
    now_ms = seconds * 1000 + microseconds // 1000
    connection.zadd(keys.CIRCUITS_OPEN, dict.fromkeys(hosts, now_ms))
    connection.zadd(keys.CIRCUITS_CHANGES, dict.fromkeys(hosts, now_ms))  # for workers' copies to see
    release_scheduled()


def test_one_probe_decides_and_an_answer_closes_the_circuit(client, receiver):
    ids = open_circuit_on(client, receiver)
    DeliverySettings.objects.filter(pk=1).update(max_in_flight_per_host=10)
    receiver.default = Reply(delay=0.2)
    end_open_period()

    deliver_everything()

    assert success_ids() == set(ids)
    assert circuit.open_circuits() == []
    after = list(DeliveryAttempt.objects.filter(outcome="success").order_by("delivered_at"))
    probe, rest = after[0], after[1:]
    probe_answered = probe.delivered_at.timestamp() + (probe.response_time_ms or 0) / 1000
    assert all(row.delivered_at.timestamp() >= probe_answered for row in rest)  # they waited for it


def test_a_failed_probe_opens_the_circuit_for_twice_as_long(client, receiver):
    open_circuit_on(client, receiver)
    DeliverySettings.objects.filter(pk=1).update(max_in_flight_per_host=10)
    end_open_period()

    run_worker()

    assert len(receiver.requests) == 4  # three failures, then one probe
    [(_, until, _, _)] = circuit.open_circuits()
    assert 55 < until - time.time() <= 60


def test_answers_that_are_not_failures_do_not_open_a_circuit(client, receiver):
    DeliverySettings(circuit_failure_threshold=2, max_in_flight_per_host=1).save()
    receiver.default = Reply(404)
    ingest_json(client, document(receiver, 5))

    run_worker()

    assert len(receiver.requests) == 5
    assert circuit.open_circuits() == []


@pytest.fixture
def circuit_admin(client):
    user = User.objects.create_user("ops", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_circuitbreaker", "change_circuitbreaker"]))
    client.force_login(user)
    return client


def test_admin_lists_open_circuits_and_staff_can_close_one_by_hand(client, receiver, circuit_admin):
    ids = open_circuit_on(client, receiver)
    host = f"127.0.0.1:{receiver.port}"

    page = circuit_admin.get("/admin/delivery/circuitbreaker/")
    assert page.status_code == 200
    assert host in page.content.decode()

    receiver.default = Reply()
    closed = circuit_admin.post("/admin/delivery/circuitbreaker/", {"host": host}, follow=True)
    assert "6 deferred postbacks go out now" in closed.content.decode()
    assert circuit.open_circuits() == []
    deliver_everything()
    assert success_ids() == set(ids)


def test_closing_a_circuit_needs_the_change_permission(client, receiver):
    open_circuit_on(client, receiver)
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_circuitbreaker"))
    client.force_login(viewer)

    assert client.get("/admin/delivery/circuitbreaker/").status_code == 200
    assert client.post("/admin/delivery/circuitbreaker/", {"host": "x"}).status_code == 403
    assert len(circuit.open_circuits()) == 1
