"""The process's Redis client and RQ queue, built once per process.

`django_rq.get_queue()` opens a new Redis client on every call; a request must not pay a TCP
handshake and seven round trips to reach Redis, so the client and queue here are module-level
and shared by every request and thread of the process.
"""

import json
import logging
import math
import threading
import time
from functools import cache
from typing import Any, cast

from django.conf import settings
from redis import Redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError
from redis.sentinel import Sentinel
from rq import Queue

logger = logging.getLogger(__name__)

# Refuse new work before Redis (noeviction) would refuse writes.
REDIS_MEMORY_HIGH_WATER = 0.9
# Redis memory a byte appended to the inbox takes: jemalloc rounds large allocations up
# (measured 1.03-1.24 for stream entries of 1 KB to 1 MB).
REDIS_BYTES_PER_PAYLOAD_BYTE = 1.25


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
    """The process's Redis client (a thread-safe connection pool) for the inbox and everything
    beside it: a Redis Cluster client when REDIS_CLUSTER_NODES is set (it answers the same
    commands, each sent to the master of its key's slot), else `get_queue_connection()`."""
    if not settings.REDIS_CLUSTER_NODES:
        return get_queue_connection()
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in settings.REDIS_CLUSTER_NODES],  # type: ignore[no-untyped-call]
        password=settings.REDIS_PASSWORD or None,
        **_OPTIONS,
    )
    return cast(Redis, cluster)


def is_cluster() -> bool:
    return bool(settings.REDIS_CLUSTER_NODES)


def master_of(key: str) -> Redis:
    """A client of the master that holds the key: `get_connection()` itself on a single Redis.
    For what must run on one server's connection (WAIT counts the replicas holding what that
    connection wrote)."""
    connection = get_connection()
    if not is_cluster():
        return connection
    node = cast(RedisCluster, connection).get_node_from_key(key)  # type: ignore[no-untyped-call]
    client: Redis = node.redis_connection
    return client


def get_many(names: list[str]) -> list[Any]:
    """MGET, which a cluster takes only for keys of one slot: there, redis-py's
    `mget_nonatomic` (one MGET per slot, pipelined)."""
    connection = get_connection()
    if is_cluster():
        return cast(RedisCluster, connection).mget_nonatomic(names)
    return connection.mget(names)


def after_cluster_error(exc: Exception) -> None:
    """A command sent to a cluster node directly failed: a master down or a slot moved. Read
    the slot map again, so that the next command goes where the slot now is."""
    if is_cluster():
        try:
            cast(RedisCluster, get_connection()).nodes_manager.initialize()
        except RedisError:
            logger.warning("could not read the cluster's slots again after %s", exc)


@cache
def get_queue_connection() -> Redis:
    """RQ's Redis (the drain jobs' queue, the workers' registrations): the master that the
    sentinels name, when REDIS_SENTINELS is set (a failover is followed on the next command
    after a connection error), else REDIS_URL. Never a cluster: RQ 2 moves a job between
    lists of different hash slots (BLMOVE) and writes a job and its queue in one MULTI."""
    if settings.REDIS_SENTINELS:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves Sentinel unannotated
            settings.REDIS_SENTINELS,
            sentinel_kwargs={"password": settings.REDIS_SENTINEL_PASSWORD or None, "socket_timeout": 2},
            password=settings.REDIS_PASSWORD or None,
            db=settings.REDIS_DB,
            **_OPTIONS,
        )
        master: Redis = sentinel.master_for(settings.REDIS_SENTINEL_MASTER)  # type: ignore[no-untyped-call]
        return master
    return Redis.from_url(settings.REDIS_URL, **_OPTIONS)


_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 10, "health_check_interval": 30}


@cache
def get_queue() -> Queue:
    return Queue(settings.POSTBACK_QUEUE, connection=get_queue_connection(), serializer=CompactJSONSerializer)


def forget_connections() -> None:
    """Build the clients again on next use (settings changed: tests, tools)."""
    get_connection.cache_clear()
    get_queue_connection.cache_clear()
    get_queue.cache_clear()


class MemoryGauge:
    """Whether Redis is near its memory cap, re-checked every INGEST_BACKLOG_CHECK_SECONDS, and
    what this process is about to write meanwhile.

    Redis runs `noeviction`: when full it refuses writes, and a sender must hear "later" (503)
    before that. Reading INFO on every request would add a round trip to the hot path, so it is
    read once a check; between checks the bytes this process lets through are counted, and a
    request that would take the last reading plus them past the mark is refused too: a burst
    of large bodies cannot overshoot by a second's worth. (The inbox's length is checked
    exactly, inside the script that appends to it.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked_at = -math.inf
        self._used = 0  # Redis's used_memory at the last check
        self._mark = 0.0  # bytes past which ingestion refuses; 0: Redis has no maxmemory
        self._pending = 0.0  # bytes this process let through since the last check

    def full_reason(self, adding: int = 0) -> str | None:
        """Why Redis should not take `adding` more bytes from this process, or None (they are
        then counted until the next check). Raises on Redis errors."""
        if self._stale():
            with self._lock:
                if self._stale():
                    self._used, self._mark = self._measure()
                    self._pending = 0.0
                    self._checked_at = time.monotonic()
        with self._lock:
            taking = adding * REDIS_BYTES_PER_PAYLOAD_BYTE
            if self._mark and self._used + self._pending + taking >= self._mark:
                return "queue storage is nearly full"
            self._pending += taking
        return None

    def _stale(self) -> bool:
        return time.monotonic() - self._checked_at >= settings.INGEST_BACKLOG_CHECK_SECONDS

    def _measure(self) -> tuple[int, float]:
        """Redis's used memory, and the mark (0 when it has no maxmemory)."""
        memory = fullest_master_memory(get_connection())
        return int(memory.get("used_memory", 0)), REDIS_MEMORY_HIGH_WATER * int(memory.get("maxmemory", 0))


def fullest_master_memory(connection: Redis) -> dict[str, Any]:
    """INFO memory of the master nearest its cap: on a cluster, a master that fills up refuses
    its shards' writes, whatever the others hold. A master that does not answer (failing over)
    is left out; the others' shards still take requests."""
    if not is_cluster():
        return connection.info("memory")
    readings = []
    for node in cast(RedisCluster, connection).get_primaries():  # type: ignore[no-untyped-call]
        try:
            readings.append(node.redis_connection.info("memory"))
        except RedisError as exc:
            after_cluster_error(exc)
    if not readings:
        raise RedisError("no master of the cluster answered")
    return max(readings, key=_fill)


def _fill(memory: dict[str, Any]) -> float:
    cap = int(memory.get("maxmemory", 0))
    return int(memory.get("used_memory", 0)) / cap if cap else 0.0


memory_gauge = MemoryGauge()
