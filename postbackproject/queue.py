"""The process's Redis client and RQ queue, built once per process.

`django_rq.get_queue()` opens a new Redis client on every call; a request must not pay a TCP
handshake and seven round trips to reach Redis, so the client and queue here are module-level
and shared by every request and thread of the process.
"""

import json
import math
import threading
import time
from functools import cache
from typing import Any

from django.conf import settings
from redis import Redis
from redis.sentinel import Sentinel
from rq import Queue

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
    """The process's Redis client (a thread-safe connection pool): the master that the
    sentinels name, when REDIS_SENTINELS is set (a failover is followed on the next command
    after a connection error), else REDIS_URL."""
    options: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 10, "health_check_interval": 30}
    if settings.REDIS_SENTINELS:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves Sentinel unannotated
            settings.REDIS_SENTINELS,
            sentinel_kwargs={"password": settings.REDIS_SENTINEL_PASSWORD or None, "socket_timeout": 2},
            password=settings.REDIS_PASSWORD or None,
            db=settings.REDIS_DB,
            **options,
        )
        master: Redis = sentinel.master_for(settings.REDIS_SENTINEL_MASTER)  # type: ignore[no-untyped-call]
        return master
    return Redis.from_url(settings.REDIS_URL, **options)


@cache
def get_queue() -> Queue:
    return Queue(settings.POSTBACK_QUEUE, connection=get_connection(), serializer=CompactJSONSerializer)


class MemoryGauge:
    """Whether Redis is near its memory cap, re-checked every INGEST_BACKLOG_CHECK_SECONDS.

    Redis runs `noeviction`: when full it refuses writes, and a sender must hear "later" (503)
    before that. Reading INFO on every request would add a round trip to the hot path; a
    second's staleness only lets a second's worth of requests past the mark. (The inbox's
    length is checked exactly, inside the script that appends to it.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked_at = -math.inf
        self._full_reason: str | None = None

    def full_reason(self) -> str | None:
        """Why Redis should take no more, or None. Raises on Redis errors."""
        if self._stale():
            with self._lock:
                if self._stale():
                    self._full_reason = self._measure()
                    self._checked_at = time.monotonic()
        return self._full_reason

    def _stale(self) -> bool:
        return time.monotonic() - self._checked_at >= settings.INGEST_BACKLOG_CHECK_SECONDS

    def _measure(self) -> str | None:
        memory = get_connection().info("memory")
        maxmemory = int(memory.get("maxmemory", 0))
        if maxmemory and int(memory.get("used_memory", 0)) >= REDIS_MEMORY_HIGH_WATER * maxmemory:
            return "queue storage is nearly full"
        return None


memory_gauge = MemoryGauge()
