"""The RQ queue between ingestion and delivery, built once per process.

`django_rq.get_queue()` opens a new Redis client on every call; a request must not pay a TCP
handshake and seven round trips to enqueue, so the client and queue here are module-level
and shared by every request and every delivery thread of the process.
"""

import json
import math
import threading
import time
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from django.conf import settings
from redis import Redis
from rq import Queue, Retry

from postbackproject.postback import DELIVER_BATCH, Batch, batch_job_id

# Failed jobs (an exception outside delivery, e.g. the database was down) stay a week for
# inspection and requeueing; postback history itself lives in the database.
FAILED_JOB_TTL_SECONDS = 7 * 24 * 3600
# A job that raised, or whose worker died, is run again this many times by RQ. Delivery
# checks recorded attempts first, so a rerun never re-sends a finished postback.
JOB_RERUNS = Retry(max=3, interval=[30, 120, 600])
# Refuse new work before Redis (noeviction) would refuse writes.
REDIS_MEMORY_HIGH_WATER = 0.9


class CompactJSONSerializer:
    """RQ serializer: JSON without spaces or \\u escapes, so jobs cost few bytes in Redis."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    @staticmethod
    def loads(data: bytes) -> Any:
        return json.loads(data)


@cache
def get_connection() -> Redis:
    """The process's Redis client (a thread-safe connection pool)."""
    return Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=30,
    )


@cache
def get_queue() -> Queue:
    return Queue(settings.POSTBACK_QUEUE, connection=get_connection(), serializer=CompactJSONSerializer)


def _job_options(batch: Batch, timeout: int) -> dict[str, Any]:
    count = len(batch["postbacks"])
    return {
        "job_id": batch_job_id(batch),
        # RQ would otherwise store the whole argument list a second time as the description.
        "description": f"deliver {count} postback{'s' if count != 1 else ''} (try {batch['attempt']})",
        "timeout": timeout,
        "result_ttl": 0,
        "failure_ttl": FAILED_JOB_TTL_SECONDS,
        "retry": JOB_RERUNS,
    }


def enqueue_batches(batches: list[Batch], timeout: int) -> None:
    """Put every batch of one request on the queue in one transactional round trip."""
    queue = get_queue()
    jobs = [Queue.prepare_data(DELIVER_BATCH, args=(batch,), **_job_options(batch, timeout)) for batch in batches]
    with queue.connection.pipeline() as pipe:
        queue.enqueue_many(jobs, pipeline=pipe)
        pipe.execute()


def schedule_batch(batch: Batch, delay_seconds: float, timeout: int) -> None:
    """Enqueue a retry now, or hand it to the RQ scheduler when it must wait."""
    queue = get_queue()
    job = queue.create_job(DELIVER_BATCH, args=(batch,), **_job_options(batch, timeout))
    if delay_seconds <= 0:
        queue.enqueue_job(job)
    else:
        queue.schedule_job(job, datetime.now(UTC) + timedelta(seconds=delay_seconds))


class Backlog:
    """Whether the queue can take more work, re-checked every INGEST_BACKLOG_CHECK_SECONDS.

    Reading the depth on every request would add a round trip to the hot path; a second's
    staleness only lets a second's worth of requests past the limit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked_at = -math.inf
        self._full_reason: str | None = None

    def full_reason(self) -> str | None:
        """Why the queue is full, or None when it has room. Raises on Redis errors."""
        if self._stale():
            with self._lock:
                if self._stale():
                    self._full_reason = self._measure()
                    self._checked_at = time.monotonic()
        return self._full_reason

    def _stale(self) -> bool:
        return time.monotonic() - self._checked_at >= settings.INGEST_BACKLOG_CHECK_SECONDS

    def _measure(self) -> str | None:
        queue = get_queue()
        with queue.connection.pipeline(transaction=False) as pipe:
            pipe.llen(queue.key)
            pipe.info("memory")
            depth, memory = pipe.execute()
        if depth >= settings.INGEST_MAX_QUEUED_JOBS:
            return f"delivery backlog is full ({depth} jobs waiting)"
        maxmemory = int(memory.get("maxmemory", 0))
        if maxmemory and int(memory.get("used_memory", 0)) >= REDIS_MEMORY_HIGH_WATER * maxmemory:
            return "queue storage is nearly full"
        return None


backlog = Backlog()
