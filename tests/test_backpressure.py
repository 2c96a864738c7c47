"""Backpressure in a real flood: ingestion answers 503 with Retry-After before Redis reaches
its memory cap (noeviction would refuse writes), loses nothing it accepted, and accepts again
once workers have drained the backlog."""

import threading

import pytest
from django.conf import settings
from django.test import Client
from redis import Redis

from postbackproject import keys
from postbackproject.queue import get_connection
from tests.conftest import Receiver, Reply, ingest_json, start_redis, success_ids, use_redis, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def capped(maxmemory: int) -> Redis:
    """The process's Redis, holding at most `maxmemory` bytes and evicting nothing (production's)."""
    redis = get_connection()
    redis.config_set("maxmemory", maxmemory)
    redis.config_set("maxmemory-policy", "noeviction")
    return redis


MAXMEMORY = 8 * 1024 * 1024
# Redis also holds each request in its client's query buffer while it runs: the 10 % between
# the mark and maxmemory must take the burst's (8 threads x 100 KB, up to twice that).
BURST_MAXMEMORY = 32 * 1024 * 1024


def test_a_flood_is_refused_before_redis_fills_up_and_taken_again_once_drained(client, receiver, processes):
    server = start_redis()
    use_redis(server.url)
    try:
        redis = capped(MAXMEMORY)
        document = {
            "endpoint": {"method": "POST", "url": receiver.url("/flood")},
            "data": [{"n": n, "pad": "x" * 4000} for n in range(20)],
        }
        accepted: list[str] = []
        while (response := ingest_json(client, document)).status_code == 202:
            accepted.extend(response.json()["postbacks"])
            assert len(accepted) < 100_000, "never refused"

        assert response.status_code == 503
        assert int(response["Retry-After"]) > 0
        assert response.json()["error"] == "queue storage is nearly full"
        assert int(redis.info("memory")["used_memory"]) < MAXMEMORY  # refused before Redis would
        assert redis.xlen(keys.INBOX) * 20 == len(accepted)  # everything answered 202 is in the inbox

        processes.worker(REDIS_URL=server.url)
        wait_until(
            lambda: ingest_json(client, document).status_code == 202, timeout=120, what="ingestion to accept again"
        )
        wait_until(lambda: success_ids() >= set(accepted), timeout=120, what="the flood delivered")
    finally:
        server.stop()


def oom_refusals(redis: Redis) -> int:
    """Writes Redis refused for being full, since it started (INFO errorstats)."""
    return int(redis.info("errorstats").get("errorstat_OOM", {}).get("count", 0))


def test_a_burst_of_large_bodies_is_refused_at_the_mark_between_two_memory_checks(settings, receiver):
    """Many threads posting large bodies within one memory check: what they are about to write
    is counted, so they get 503 at the mark, and Redis never refuses a write."""
    settings.INGEST_BACKLOG_CHECK_SECONDS = 3600  # one reading for the whole burst
    server = start_redis()
    use_redis(server.url)
    try:
        redis = capped(BURST_MAXMEMORY)
        document = {
            "endpoint": {"method": "POST", "url": receiver.url("/burst")},
            "data": [{"n": n, "pad": "x" * 10_000} for n in range(10)],  # 100 KB a request
        }
        answers: list[tuple[int, str]] = []

        def send_until_refused() -> None:
            client = Client()
            while (response := ingest_json(client, document)).status_code == 202:
                answers.append((202, ""))
            answers.append((response.status_code, response.json()["error"]))

        threads = [threading.Thread(target=send_until_refused) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

        refusals = [answer for answer in answers if answer[0] != 202]
        assert refusals == [(503, "queue storage is nearly full")] * 8
        assert oom_refusals(redis) == 0
        assert int(redis.info("memory")["used_memory"]) < BURST_MAXMEMORY
        assert redis.xlen(keys.INBOX) == sum(status == 202 for status, _ in answers)  # all accepted are kept
    finally:
        server.stop()


def test_a_worker_rides_out_a_full_redis_and_delivers_once_there_is_room(client, processes):
    """Redis fills up while a drainer has requests out: what it sent is recorded once, the
    worker keeps running through Redis's refusals (heartbeat, taking jobs, RQ's bookkeeping),
    and delivers new work once memory is freed."""
    server = start_redis()
    use_redis(server.url)
    slow = Receiver(Reply(delay=1.0))
    try:
        redis = get_connection()
        worker = processes.worker(REDIS_URL=server.url)
        wait_until(lambda: redis.scard(keys.queue_workers(settings.POSTBACK_QUEUE)) == 1, 60, "the worker to start")
        first = ingest_json(client, {"endpoint": {"method": "GET", "url": slow.url("/first")}, "data": [{}] * 3})
        wait_until(lambda: len(slow.requests) == 3, 30, "the first postbacks to be in flight")

        redis.config_set("maxmemory", int(redis.info("memory")["used_memory"]) // 2)  # full: writes refused
        refused = oom_refusals(redis)
        wait_until(lambda: success_ids() >= set(first.json()["postbacks"]), 30, "them to be recorded")
        wait_until(lambda: oom_refusals(redis) >= refused + 12, 60, "the worker to meet Redis's refusals")
        assert worker.poll() is None

        redis.config_set("maxmemory", 0)
        later = ingest_json(client, {"endpoint": {"method": "GET", "url": slow.url("/later")}, "data": [{}]})
        wait_until(lambda: success_ids() >= set(later.json()["postbacks"]), 60, "delivery once there is room")
        assert worker.poll() is None
        assert sorted(slow.postback_ids()) == sorted(first.json()["postbacks"] + later.json()["postbacks"])
    finally:
        slow.close()
        server.stop()


def test_a_worker_started_while_redis_is_full_waits_for_room_then_delivers(client, receiver, processes):
    """A worker (re)started while Redis refuses writes does not exit at its registration: it
    waits, registers once there is room, and delivers."""
    server = start_redis()
    use_redis(server.url)
    try:
        redis = capped(MAXMEMORY)
        redis.config_set("maxmemory", int(redis.info("memory")["used_memory"]) // 2)  # full: writes refused
        refused = oom_refusals(redis)
        worker = processes.worker(REDIS_URL=server.url)
        wait_until(lambda: oom_refusals(redis) >= refused + 2, 60, "the starting worker to meet Redis's refusals")
        assert worker.poll() is None

        redis.config_set("maxmemory", MAXMEMORY)
        wait_until(lambda: redis.scard(keys.queue_workers(settings.POSTBACK_QUEUE)) == 1, 60, "the worker to register")
        answer = ingest_json(client, {"endpoint": {"method": "GET", "url": receiver.url("/after")}, "data": [{}]})
        wait_until(lambda: success_ids() >= set(answer.json()["postbacks"]), 60, "delivery once there is room")
        assert worker.poll() is None
    finally:
        server.stop()
