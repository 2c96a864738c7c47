"""The inbox protocol: leases, sweeping, taking over a dead drainer's entries, resuming from
the attempt log, scheduling by postback. State a crash leaves behind, recovered by the real
worker code."""

import json
import time
from typing import Any

import pytest

from delivery.drain import Drainer, request_stop
from delivery.models import DeliveryAttempt, DeliverySettings
from postbackproject import inbox, keys, shards
from postbackproject.keys import REJECTED
from postbackproject.postback import Try
from postbackproject.queue import get_connection, get_queue
from tests.conftest import Reply, deliver_everything, ingest_json, run_worker, scheduled_retries, success_ids

pytestmark = pytest.mark.django_db(transaction=True)


def document(receiver, count: int) -> dict[str, object]:
    return {"endpoint": {"method": "GET", "url": receiver.url("/p?n={n}")}, "data": [{"n": n} for n in range(count)]}


def the_entry() -> bytes:
    entries: Any = get_connection().xrange(keys.INBOX)
    [(_, fields)] = entries
    return bytes(fields[b"r"])


def pending_with_a_dead_drainer(entry: bytes) -> None:
    """The entry back in the inbox, claimed by a drainer whose lease is gone: what a worker
    killed after recording, before acknowledging, leaves behind."""
    connection = get_connection()
    connection.delete(keys.LEASES)
    connection.xadd(keys.INBOX, {"r": entry})
    connection.xreadgroup(keys.GROUP, "drain-dead", {keys.INBOX: ">"}, count=10)


def test_a_dead_drainers_entries_are_taken_over_and_nothing_recorded_is_sent_again(client, receiver):
    ingest_json(client, document(receiver, 4))
    entry = the_entry()
    run_worker()
    pending_with_a_dead_drainer(entry)

    run_worker()

    assert len(receiver.requests) == 4
    assert get_connection().xlen(keys.INBOX) == 0
    assert get_connection().xpending(keys.INBOX, keys.GROUP)["pending"] == 0


def test_a_try_recorded_as_will_retry_is_only_rescheduled_when_taken_over(client, receiver):
    receiver.answer(Reply(503))
    [pid] = ingest_json(client, document(receiver, 1)).json()["postbacks"]
    entry = the_entry()
    run_worker()
    get_connection().delete(keys.DUE, keys.DUE_TRIES)  # died before its retry was scheduled
    pending_with_a_dead_drainer(entry)

    run_worker()

    assert len(receiver.requests) == 1
    [(retry, _)] = scheduled_retries()
    assert (retry.postback_id, retry.attempt) == (pid, 2)
    deliver_everything()
    assert [row.outcome for row in DeliveryAttempt.objects.filter(postback_id=pid).order_by("attempt")] == [
        "retry",
        "success",
    ]


def test_scheduling_a_try_twice_keeps_one():
    item = Try("p-0", 2, 0, "GET", "http://h/", None)
    for delay in (60, 90):
        inbox.schedule_tries(shards.MAIN, [(item, delay)])

    [(waiting, due)] = scheduled_retries()
    assert waiting == item
    assert due > time.time() + 80


def test_the_sweep_starts_a_drainer_for_orphaned_work_only_when_no_drainer_is_alive(client, receiver):
    get_connection().xadd(keys.INBOX, {"r": json.dumps(["abc", 0, "GET", receiver.url("/o"), [{}]])})
    get_connection().zadd(keys.LEASES, {"drain-alive": time.time() * 1000 + 60_000})

    inbox.sweep()
    assert get_queue().count == 0

    get_connection().delete(keys.LEASES)  # its lease ran out
    inbox.sweep()
    assert get_queue().count == 1
    run_worker()
    assert receiver.targets == ["/o"]


def test_due_tries_are_moved_into_the_inbox_and_later_ones_wait(client):
    soon, later = Try("a-0", 2, 0, "GET", "http://h/a", None), Try("b-0", 2, 0, "GET", "http://h/b", None)
    inbox.schedule_tries(shards.MAIN, [(soon, -1), (later, 60)])

    assert inbox.sweep() == 1

    entries: Any = get_connection().xrange(keys.INBOX)
    [(_, fields)] = entries
    assert json.loads(fields[b"t"]) == [json.loads(soon.to_json())]
    assert [item for item, _ in scheduled_retries()] == [later]


def test_a_drain_job_whose_lease_ran_out_while_queued_stands_down_when_enough_are_alive():
    get_connection().zadd(keys.LEASES, {"drain-other": time.time() * 1000 + 60_000})

    assert Drainer.in_this_process("drain-late").run() == {"not needed": 1}


def test_an_entry_that_is_not_ours_is_set_aside_and_the_rest_delivered(client, receiver):
    get_connection().xadd(keys.INBOX, {"r": b"not json at all"})
    ingest_json(client, document(receiver, 1))

    run_worker()

    assert len(receiver.requests) == 1
    [kept] = get_connection().lrange(REJECTED, 0, -1)
    assert json.loads(kept)["payload"] == "not json at all"
    assert get_connection().xlen(keys.INBOX) == 0


def test_a_drainer_asked_to_stop_hands_its_unsent_postbacks_to_a_successor(client, receiver):
    DeliverySettings(max_in_flight_per_host=1).save()
    receiver.answer(Reply(delay=0.3))
    ids = ingest_json(client, document(receiver, 3)).json()["postbacks"]
    [job] = get_queue().jobs
    job.delete()
    drainer = Drainer.in_this_process(job.id)
    original_step = drainer.engine.step

    def stop_once_sending(*args, **kwargs):
        if drainer.engine.in_flight:
            request_stop()  # SIGTERM to the worker, with one request out
        return original_step(*args, **kwargs)

    drainer.engine.step = stop_once_sending  # type: ignore[method-assign]

    drainer.run()

    assert len(receiver.requests) == 1  # the one in flight finished; the rest were not started
    [successor] = get_queue().jobs
    assert successor.id != job.id
    request_stop.__globals__["_stop"].clear()
    run_worker()
    assert success_ids() == set(ids)
    assert len(receiver.requests) == 3


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("t", b'[["p-0", 1, 0, "GET", "http://h/", {"not": "text"}]]'),
        ("t", b'[["p-0", 1, 1, "GET", "http://h/", null]]'),
        ("t", b'[["p-0", 1, 0, "TRACE", "http://h/", null]]'),
        ("r", b'["abc", 0, "GET", "http://h/{x}", [["not", "an", "object"]]]'),
        ("r", b'["abc", 0, "GET", "http://h/{x}", [{"x": {"nested": 1}}]]'),
        ("r", b"[" * 5000 + b"]" * 5000),
        ("x", b"[]"),
    ],
)
def test_entries_not_shaped_as_ours_are_set_aside_without_failing_the_drainer(client, receiver, kind, payload):
    get_connection().xadd(keys.INBOX, {kind: payload})
    ingest_json(client, document(receiver, 1))

    run_worker()

    assert len(receiver.requests) == 1
    assert get_connection().llen(REJECTED) == 1


def test_an_entry_whose_drainers_keep_dying_is_set_aside(receiver):
    connection = get_connection()
    connection.xgroup_create(keys.INBOX, keys.GROUP, id="0", mkstream=True)
    entry_id = connection.xadd(keys.INBOX, {"r": json.dumps(["abc", 0, "GET", receiver.url("/x"), [{}]])})
    connection.xreadgroup(keys.GROUP, "drain-dead", {keys.INBOX: ">"})
    for n in range(5):  # five more drainers took it and died
        connection.xclaim(keys.INBOX, keys.GROUP, f"drain-dead-{n}", 0, [entry_id])

    run_worker()

    assert receiver.requests == []
    [kept] = connection.lrange(REJECTED, 0, -1)
    assert "drainers kept dying" in json.loads(kept)["why"]
