"""A drainer's lease against the real Redis: taking, renewing, recruiting, reclaiming, leaving."""

import json
from typing import Any

import pytest

from delivery.clock import RedisClock
from delivery.lease import FAILURE_PAUSE_MS, Lease
from postbackproject import inbox, keys
from postbackproject.queue import get_connection, get_queue
from tests.fakes import FakeClock

pytestmark = pytest.mark.django_db


def a_lease(drainer_id: str, clock: FakeClock | None = None) -> Lease:
    connection = get_connection()
    return Lease(connection, drainer_id, "postbacks", RedisClock(connection, clock or FakeClock()))


def redis_ms() -> int:
    seconds, microseconds = get_connection().time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def expiry(drainer_id: str) -> float:
    score: Any = get_connection().zscore(keys.LEASES, drainer_id)
    return float(score)


def a_worker_listening() -> None:
    get_connection().sadd(keys.queue_workers("postbacks"), "worker-1")


def test_a_drainer_takes_a_lease_on_redis_clock_when_none_is_alive():
    before = redis_ms()

    assert a_lease("drain-a").take()

    assert before + inbox.LEASE_MS <= expiry("drain-a") <= redis_ms() + inbox.LEASE_MS


def test_a_drainer_stands_down_when_as_many_are_alive_as_workers_listen():
    a_worker_listening()
    assert a_lease("drain-a").take()

    assert not a_lease("drain-b").take()
    assert get_connection().zscore(keys.LEASES, "drain-b") is None


def test_a_drainer_keeps_the_lease_registered_for_it_however_many_are_alive():
    a_worker_listening()
    assert a_lease("drain-a").take()
    get_connection().zadd(keys.LEASES, {"drain-b": redis_ms() + 1000})  # registered when it was queued

    assert a_lease("drain-b").take()


def test_renewing_never_shortens_and_a_failure_shortens_to_the_pause():
    lease = a_lease("drain-a")
    get_connection().zadd(keys.LEASES, {"drain-a": redis_ms() + 10 * inbox.LEASE_MS})
    lease.renew()
    assert expiry("drain-a") > redis_ms() + 5 * inbox.LEASE_MS

    lease.release_after_failure()

    assert expiry("drain-a") <= redis_ms() + FAILURE_PAUSE_MS


def test_every_lease_reply_sets_the_estimate_of_redis_clock():
    clock = FakeClock(start=5.0)  # nothing like Unix time: only intervals count
    lease = a_lease("drain-a", clock)
    lease.renew()
    clock.now += 60

    estimate = lease.redis_clock.now()

    assert redis_ms() / 1000 + 59 <= estimate <= redis_ms() / 1000 + 61


def test_a_recruit_is_started_up_to_one_drainer_per_worker():
    a_worker_listening()
    get_connection().sadd(keys.queue_workers("postbacks"), "worker-2")
    assert a_lease("drain-a").take()

    assert a_lease("drain-a").recruit()
    assert not a_lease("drain-a").recruit()

    [job] = get_queue().jobs
    assert get_connection().zscore(keys.LEASES, job.id) is not None


def entries_read_by(consumer: str, count: int) -> list[str]:
    connection = get_connection()
    connection.xgroup_create(keys.INBOX, keys.GROUP, id="0", mkstream=True)
    ids = [inbox.text(connection.xadd(keys.INBOX, {"r": json.dumps([n])})) for n in range(count)]
    connection.xreadgroup(keys.GROUP, consumer, {keys.INBOX: ">"})
    return ids


def test_a_dead_drainers_entries_are_reclaimed_with_how_often_they_were_read():
    ids = entries_read_by("drain-dead", 3)  # no lease: dead

    taken = a_lease("drain-a").reclaim()

    assert [item.entry.id for item in taken] == ids
    assert all(item.deliveries == 2 for item in taken)  # read by the dead one, and now by us


def test_a_live_drainers_entries_are_not_reclaimed():
    entries_read_by("drain-alive", 2)
    get_connection().zadd(keys.LEASES, {"drain-alive": redis_ms() + 60_000})

    assert a_lease("drain-a").reclaim() == []


def test_an_idle_drainer_stays_while_entries_are_unread_and_leaves_when_none_are():
    lease = a_lease("drain-a")
    assert lease.take()
    get_connection().xgroup_create(keys.INBOX, keys.GROUP, id="0", mkstream=True)
    get_connection().xadd(keys.INBOX, {"r": "[]"})

    assert not lease.leave()
    read: Any = get_connection().xreadgroup(keys.GROUP, "drain-a", {keys.INBOX: ">"})
    [(_, [(entry_id, _)])] = read
    get_connection().xack(keys.INBOX, keys.GROUP, entry_id)

    assert lease.leave()
    assert get_connection().zscore(keys.LEASES, "drain-a") is None


def test_handing_over_with_entries_pending_starts_a_successor():
    lease = a_lease("drain-a")
    assert lease.take()
    entries_read_by("drain-a", 1)

    assert lease.leave(handing_over=True)

    [successor] = get_queue().jobs
    assert get_connection().zscore(keys.LEASES, successor.id) is not None
    assert get_connection().zscore(keys.LEASES, "drain-a") is None
