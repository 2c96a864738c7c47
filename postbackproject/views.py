"""Operations endpoints that belong to no app: health, readiness and metrics."""

import hmac
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_safe
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from redis.exceptions import RedisError

from postbackproject import shards
from postbackproject.metrics import SharedStateCollector, exposition
from postbackproject.queue import REDIS_MEMORY_HIGH_WATER, fullest_master_memory, get_connection


@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    """200 while the process can answer at all: no database, no Redis.

    Load balancers take a process out on this; it must not fail because a dependency is down
    (that is /readyz's question), and it is the benchmark's floor for a Django response.
    """
    return HttpResponse(b"ok\n", content_type="text/plain")


@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    """200 when this process can do its work: Redis and the database answer, and ingestion
    would take a request (the inbox is under its limit, Redis under its memory mark). 503
    otherwise, naming each problem, so that a load balancer stops sending here."""
    checks = readiness()
    problems = {name: result for name, result in checks.items() if result != "ok"}
    if problems:
        summary = "; ".join(f"{name}: {result}" for name, result in problems.items())
        return JsonResponse({"error": f"not ready: {summary}", "checks": checks}, status=503)
    return JsonResponse({"status": "ready", "checks": checks})


@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus's scrape: 404 unless METRICS_TOKEN is set, 401 without it as a bearer token."""
    token = settings.METRICS_TOKEN
    if not token:
        raise Http404
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        response = HttpResponse(b"a bearer token is needed\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    shared = SharedStateCollector(settings.POSTBACK_QUEUE, ready=lambda: all(r == "ok" for r in readiness().values()))
    return HttpResponse(exposition(shared), content_type=CONTENT_TYPE_PLAIN_0_0_4)


def readiness() -> dict[str, str]:
    """Each check's answer, "ok" or what is wrong: Redis (reachable, under its memory mark),
    the database, and the backlog (the inbox under INGEST_MAX_QUEUED_JOBS entries)."""
    redis, backlog = _redis_and_backlog_checks()
    return {"redis": redis, "database": _database_check(), "backlog": backlog}


def _redis_and_backlog_checks() -> tuple[str, str]:
    """Without Redis the backlog cannot be known. The backlog is the longest shard's: the
    limit holds for each shard (ingestion checks the one it appends to)."""
    try:
        redis = get_connection()
        memory = fullest_master_memory(redis)
        with redis.pipeline(transaction=False) as pipe:
            for shard in shards.configured():
                pipe.xlen(shard.inbox)
            waiting = max(pipe.execute())
    except RedisError as exc:
        return f"unreachable: {exc}", "unknown: Redis is unreachable"
    return _memory_check(memory), _backlog_check(waiting)


def _memory_check(memory: dict[str, Any]) -> str:
    maxmemory = int(memory.get("maxmemory", 0))
    if maxmemory and int(memory.get("used_memory", 0)) >= REDIS_MEMORY_HIGH_WATER * maxmemory:
        return f"memory nearly full: {memory.get('used_memory_human')} of {memory.get('maxmemory_human')}"
    return "ok"


def _backlog_check(waiting: int) -> str:
    """The inbox's length against the limit ingestion refuses new requests at (503)."""
    limit = settings.INGEST_MAX_QUEUED_JOBS
    if waiting >= limit:
        return f"full: {waiting} inbox entries, the limit (INGEST_MAX_QUEUED_JOBS) is {limit}"
    return "ok"


def _database_check() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return f"unreachable: {exc}"
    return "ok"
