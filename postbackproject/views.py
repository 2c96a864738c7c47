"""Operations endpoints that belong to no app: the process's health and readiness."""

from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_safe
from redis.exceptions import RedisError

from postbackproject import inbox
from postbackproject.queue import REDIS_MEMORY_HIGH_WATER, get_connection


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
    checks = {"redis": _redis_check(), "database": _database_check()}
    problems = {name: result for name, result in checks.items() if result != "ok"}
    if problems:
        summary = "; ".join(f"{name}: {result}" for name, result in problems.items())
        return JsonResponse({"error": f"not ready: {summary}", "checks": checks}, status=503)
    return JsonResponse({"status": "ready", "checks": checks})


def _redis_check() -> str:
    try:
        redis = get_connection()
        with redis.pipeline(transaction=False) as pipe:
            pipe.xlen(inbox.INBOX)
            pipe.info("memory")
            waiting, memory = pipe.execute()
    except RedisError as exc:
        return f"unreachable: {exc}"
    if waiting >= settings.INGEST_MAX_QUEUED_JOBS:
        return f"backlog full: {waiting} inbox entries (INGEST_MAX_QUEUED_JOBS is {settings.INGEST_MAX_QUEUED_JOBS})"
    maxmemory = int(memory.get("maxmemory", 0))
    if maxmemory and int(memory.get("used_memory", 0)) >= REDIS_MEMORY_HIGH_WATER * maxmemory:
        return f"memory nearly full: {memory.get('used_memory_human')} of {memory.get('maxmemory_human')}"
    return "ok"


def _database_check() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return f"unreachable: {exc}"
    return "ok"
