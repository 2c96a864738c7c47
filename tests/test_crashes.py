"""Nothing accepted is lost when a process dies at any instant: real processes, really killed.

Each test waits with a deadline for every postback to be delivered; the deadlines are the
service's promises (a killed worker's postbacks go out within a minute), not speed checks.
"""

import json
import signal
import time
from collections import Counter

import pytest
from django.db import connection

from delivery.models import DeliveryAttempt, DeliverySettings
from postbackproject import keys
from postbackproject.queue import get_connection
from tests.conftest import (
    Receiver,
    Reply,
    ingest_json,
    start_redis,
    success_ids,
    use_redis,
    wait_until,
)
from tests.proxy import TcpProxy

pytestmark = pytest.mark.django_db(transaction=True)

# A worker killed with SIGKILL: every postback it held is delivered within this long.
RECOVERY_SECONDS = 60


def postbacks(receiver: Receiver, count: int, path: str = "/p?n={n}") -> dict[str, object]:
    return {"endpoint": {"method": "GET", "url": receiver.url(path)}, "data": [{"n": n} for n in range(count)]}


def duplicates(receiver: Receiver) -> int:
    return sum(times - 1 for times in Counter(receiver.postback_ids()).values())


def one_success_each(ids: list[str]) -> bool:
    counts = Counter(DeliveryAttempt.objects.filter(outcome="success").values_list("postback_id", flat=True))
    return all(counts[pid] == 1 for pid in ids)


def test_a_worker_killed_mid_job_loses_nothing_and_a_colleague_delivers_the_rest(client, processes):
    slow = Receiver(Reply(delay=0.3))
    try:
        victim = processes.worker(DELIVERY_CONCURRENCY="16")
        ids = [pid for _ in range(2) for pid in ingest_json(client, postbacks(slow, 100)).json()["postbacks"]]
        wait_until(lambda: len(slow.requests) >= 20, timeout=30, what="the first worker to be sending")

        victim.kill()
        victim.wait()
        processes.worker(DELIVERY_CONCURRENCY="16")

        wait_until(lambda: success_ids() >= set(ids), timeout=RECOVERY_SECONDS, what="every postback delivered")
        assert one_success_each(ids)
        # Sent twice at most: what was in flight in the killed job, that is, sent and not yet
        # recorded (16 requests out, and as many replies back within one 20 ms settle).
        assert duplicates(slow) <= 2 * 16
    finally:
        slow.close()


@pytest.mark.parametrize("step", ["read", "send", "record", "commit"])
def test_a_worker_dying_after_any_step_loses_nothing(client, processes, receiver, step):
    DeliverySettings(backoff_base_seconds=0).save()
    receiver.answer(Reply(503))  # one retry, so that a retry is in play at every step
    ids = ingest_json(client, postbacks(receiver, 20)).json()["postbacks"]
    doomed = processes.run(["tests/crashing.py", "worker", step])
    assert doomed.wait(timeout=30) == 9, processes.output()
    delivered_before = success_ids()
    assert bool(delivered_before) == (step in ("record", "commit"))

    processes.worker()

    wait_until(lambda: success_ids() >= set(ids), timeout=RECOVERY_SECONDS, what="every postback delivered")
    assert one_success_each(ids)
    sent = Counter(receiver.postback_ids())
    assert all(sent[pid] == 1 for pid in delivered_before)  # what was recorded is never sent again
    assert duplicates(receiver) <= 1 + len(ids) - len(delivered_before)  # the retry, and the unrecorded


def test_a_web_process_dying_after_the_inbox_took_the_request_loses_nothing(processes, receiver):
    document = json.dumps(postbacks(receiver, 3))
    dying = processes.run(["tests/crashing.py", "ingest", document])
    assert dying.wait(timeout=30) == 9, processes.output()
    assert get_connection().xlen(keys.INBOX) == 1  # accepted, and no drainer was started

    processes.worker()

    wait_until(lambda: len(success_ids()) == 3, timeout=RECOVERY_SECONDS, what="the orphaned entry delivered")
    assert duplicates(receiver) == 0


def test_redis_killed_and_restarted_keeps_queued_postbacks_and_scheduled_retries(client, processes, receiver):
    """SIGKILL to Redis: every write it acknowledged is in the append-only file's page cache."""
    server = start_redis(aof=True)
    use_redis(server.url)
    try:
        DeliverySettings(backoff_base_seconds=2, backoff_factor=1).save()
        receiver.answer(*[Reply(503)] * 5)
        retried = ingest_json(client, postbacks(receiver, 5, "/retried?n={n}")).json()["postbacks"]
        worker = processes.worker(REDIS_URL=server.url)
        wait_until(lambda: get_connection().zcard(keys.DUE) == 5, timeout=30, what="five retries scheduled")
        worker.kill()
        worker.wait()
        queued = ingest_json(client, postbacks(receiver, 5, "/queued?n={n}")).json()["postbacks"]

        server.kill()
        server = start_redis(aof=True, port=server.port, workdir=server.workdir)
        processes.worker(REDIS_URL=server.url)

        wait_until(lambda: success_ids() >= set(retried + queued), timeout=RECOVERY_SECONDS, what="all delivered")
        assert one_success_each(retried + queued)
        assert Counter(receiver.postback_ids()) == Counter({pid: 2 for pid in retried} | {pid: 1 for pid in queued})
    finally:
        server.stop()


# The outage itself lasts this long (the figure), whatever the service does meanwhile.
DATABASE_OUTAGE_SECONDS = 30


@pytest.mark.skipif(connection.vendor != "postgresql", reason="a database server reached over TCP")
def test_a_database_unreachable_for_30_seconds_during_delivery_loses_nothing(client, processes):
    params = connection.settings_dict
    proxy = TcpProxy(params["HOST"] or "127.0.0.1", int(params["PORT"] or 5432))
    slow = Receiver(Reply(delay=0.5))
    try:
        proxied = f"postgres://{params['USER']}@127.0.0.1:{proxy.port}/{params['NAME']}"
        processes.worker(DATABASE_URL=proxied, DELIVERY_CONCURRENCY="16", DELIVERY_SETTINGS_CACHE_SECONDS="5")
        ids = [pid for _ in range(3) for pid in ingest_json(client, postbacks(slow, 100)).json()["postbacks"]]
        wait_until(lambda: len(success_ids()) >= 16, timeout=30, what="deliveries recorded before the outage")

        proxy.cut()
        cut_at = len(slow.requests)
        time.sleep(DATABASE_OUTAGE_SECONDS)  # the outage, not a wait for something to happen
        proxy.restore()

        wait_until(lambda: success_ids() >= set(ids), timeout=RECOVERY_SECONDS, what="every postback recorded")
        assert one_success_each(ids)
        assert len(slow.requests) > cut_at  # delivery went on across the outage...
        assert duplicates(slow) == 0  # ...and every request sent was recorded once, late
    finally:
        proxy.close()
        slow.close()


def test_a_warm_stop_lets_the_request_in_flight_finish_and_records_it(client, processes):
    slow = Receiver(Reply(delay=1.0))
    try:
        worker = processes.worker()
        [pid] = ingest_json(client, postbacks(slow, 1)).json()["postbacks"]
        wait_until(lambda: len(slow.requests) == 1, timeout=30, what="the request to be out")

        worker.send_signal(signal.SIGTERM)

        assert worker.wait(timeout=30) == 0
        assert success_ids() == {pid}  # recorded before the worker left
    finally:
        slow.close()


def test_a_warm_stop_cuts_off_what_outlasts_its_grace_and_the_next_worker_sends_it(client, processes, receiver):
    receiver.answer(Reply(delay=60))  # the first request hangs; any later one is answered at once
    worker = processes.worker(DELIVERY_STOP_GRACE_SECONDS="1")
    [pid] = ingest_json(client, postbacks(receiver, 1)).json()["postbacks"]
    wait_until(lambda: len(receiver.requests) == 1, timeout=30, what="the request to be out")

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=30) == 0
    assert not DeliveryAttempt.objects.exists()  # cut off, not waited for (it would time out: a row)
    processes.worker()
    wait_until(lambda: success_ids() == {pid}, timeout=RECOVERY_SECONDS, what="the postback sent again")
    assert len(receiver.requests) == 2
