"""What each part of the service spends on one postback in a scenario: Redis CPU (INFO cpu, and
INFO commandstats per command), web CPU per request, worker CPU per postback, database rows and
bytes per postback, and Redis memory per postback waiting. docs/scaling.md turns these into
ceilings per core (docs/decisions.md, 74).

Counters are read once before the load and once after the wait, so the tool's own traffic
(a few cheap commands a second) stays a rounding error. The arithmetic is pure functions of
the readings, tested without processes.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil
from django.db import connections
from redis import Redis

from benchmark.metrics import ratio
from delivery.models import DeliveryAttempt, PostbackRequest

# The commands shown per scenario, most Redis time first; the JSON keeps every one.
TOP_COMMANDS = 6
# PostgreSQL's backends can be read with psutil only where the server runs on this machine.
LOOPBACK_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})
# Tables whose rows and bytes are counted: the attempt log (a partition a day on PostgreSQL,
# each named `<table>_pYYYYMMDD`) and each postback's request, written once.
TABLES = {"attempt": DeliveryAttempt, "request": PostbackRequest}


@dataclass(frozen=True)
class CommandCount:
    calls: int
    usec: int  # Redis's own time executing the command (a script's includes its commands')


@dataclass(frozen=True)
class RedisCounters:
    cpu_seconds: float  # used_cpu_user + used_cpu_sys: Redis's main process and its threads
    commands: dict[str, CommandCount]


@dataclass(frozen=True)
class TableCounts:
    rows: dict[str, int]  # "attempt" / "request" -> rows
    bytes: dict[str, int] | None  # the same -> bytes with indexes and TOAST; None: not PostgreSQL
    # CPU seconds of each backend (pid) connected to the database; None: not a PostgreSQL on this machine
    backend_cpu: dict[int, float] | None = None


def command_counts(section: Mapping[str, Any]) -> dict[str, CommandCount]:
    """INFO commandstats as redis-py returns it (`cmdstat_xadd` -> {"calls": 3, "usec": 12, ...},
    subcommands as `cmdstat_client|setname`) -> command name -> its counts."""
    counts = {}
    for key, fields in section.items():
        if key.startswith("cmdstat_") and isinstance(fields, Mapping):
            counts[key.removeprefix("cmdstat_")] = CommandCount(int(fields["calls"]), int(fields["usec"]))
    return counts


def redis_counters(redis: Redis) -> RedisCounters:
    cpu = redis.info("cpu")
    return RedisCounters(
        cpu_seconds=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        commands=command_counts(redis.info("commandstats")),
    )


def used_memory(redis: Redis) -> int:
    return int(redis.info("memory")["used_memory"])


def table_counts(alias: str) -> TableCounts:
    rows = {name: model._default_manager.using(alias).count() for name, model in TABLES.items()}
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return TableCounts(rows, None)
    sizes = {}
    with connection.cursor() as cursor:
        for name, model in TABLES.items():
            table = model._meta.db_table
            # relkind 'r': plain tables and the day partitions (a partitioned parent is 'p', 0 bytes).
            cursor.execute(
                "SELECT coalesce(sum(pg_total_relation_size(oid)), 0) FROM pg_class"
                " WHERE relkind = 'r' AND (relname = %s OR relname ~ %s)",
                [table, f"^{table}_p[0-9]{{8}}$"],
            )
            sizes[name] = int(cursor.fetchone()[0])
        cpu = None
        if connection.settings_dict.get("HOST", "") in LOOPBACK_HOSTS:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            cpu = backend_cpu([int(pid) for (pid,) in cursor.fetchall()])
    return TableCounts(rows, sizes, cpu)


def backend_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each PostgreSQL backend still running."""
    seconds = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:  # gone since the query, or not ours to read
            continue
        seconds[pid] = float(times.user + times.system)
    return seconds


def backend_cpu_used(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds the backends spent between two readings: a backend that connected meanwhile
    counts from zero; one that disconnected meanwhile is lost (the workers keep theirs open)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def analyze(alias: str) -> None:
    """Fresh planner statistics for the attempt and request tables (PostgreSQL; each partition
    too). The recording's INSERT looks up each try and request before writing it, and on a
    partition never analyzed the planner reads the partition whole for every batch instead of
    using its index (170 ms instead of 5 ms for 200 requests over 340,000 rows, measured): a
    server whose autovacuum is on analyzes a growing partition by itself, a shared test server
    with it off does not, and the figures would measure stale statistics rather than the service."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for model in TABLES.values():
            cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")


def redis_command_figures(
    before: Mapping[str, CommandCount], after: Mapping[str, CommandCount], postbacks: int
) -> dict[str, dict[str, float | None]]:
    """Per command run during the scenario, most time first: calls and Redis µs per postback,
    and µs per call."""
    figures = {}
    for name, now in after.items():
        then = before.get(name, CommandCount(0, 0))
        calls, usec = now.calls - then.calls, now.usec - then.usec
        if calls > 0:
            figures[name] = {
                "calls_per_postback": ratio(calls, postbacks),
                "usec_per_call": usec / calls,
                "usec_per_postback": ratio(usec, postbacks),
                "usec": float(usec),
            }
    return dict(sorted(figures.items(), key=lambda item: -(item[1]["usec"] or 0.0)))


def database_figures(before: TableCounts, after: TableCounts, postbacks: int) -> dict[str, float | None]:
    attempts = after.rows["attempt"] - before.rows["attempt"]
    requests = after.rows["request"] - before.rows["request"]
    figures: dict[str, float | None] = {
        "attempt_rows": float(attempts),
        "request_rows": float(requests),
        "attempt_rows_per_postback": ratio(attempts, postbacks),
        "request_rows_per_postback": ratio(requests, postbacks),
        "attempt_bytes_per_row": None,
        "request_bytes_per_row": None,
        "bytes_per_postback": None,
        "backend_cpu_us_per_postback": None,
        "backend_cpu_us_per_attempt_row": None,
    }
    if before.backend_cpu is not None and after.backend_cpu is not None:
        used = 1e6 * backend_cpu_used(before.backend_cpu, after.backend_cpu)
        figures["backend_cpu_us_per_postback"] = ratio(used, postbacks)
        figures["backend_cpu_us_per_attempt_row"] = ratio(used, attempts)
    if before.bytes is not None and after.bytes is not None:
        grown = {name: after.bytes[name] - before.bytes[name] for name in TABLES}
        figures["attempt_bytes_per_row"] = ratio(grown["attempt"], attempts)
        figures["request_bytes_per_row"] = ratio(grown["request"], requests)
        figures["bytes_per_postback"] = ratio(sum(grown.values()), postbacks)
    return figures


@dataclass(frozen=True)
class CostReadings:
    """What a scenario read for its costs: counters before the load and after the wait, and
    the CPU seconds of the service's processes by role (web, workers, redis)."""

    redis_before: RedisCounters
    redis_after: RedisCounters
    tables_before: TableCounts
    tables_after: TableCounts


def cost_figures(
    readings: CostReadings, cpu_by_role: Mapping[str, float], requests: int, postbacks: int
) -> dict[str, Any]:
    """Each part's cost of one postback (web: of one request too), from the readings and the
    postbacks accepted. CPU by role is None where the tool did not start the processes."""
    web, workers = cpu_by_role.get("web"), cpu_by_role.get("workers")
    redis_cpu = readings.redis_after.cpu_seconds - readings.redis_before.cpu_seconds
    return {
        "postbacks": postbacks,
        "requests": requests,
        "web_cpu_us_per_request": ratio(None if web is None else 1e6 * web, requests),
        "web_cpu_us_per_postback": ratio(None if web is None else 1e6 * web, postbacks),
        "worker_cpu_us_per_postback": ratio(None if workers is None else 1e6 * workers, postbacks),
        "redis_cpu_us_per_postback": ratio(1e6 * redis_cpu, postbacks),
        "redis_commands": redis_command_figures(
            readings.redis_before.commands, readings.redis_after.commands, postbacks
        ),
        "database": database_figures(readings.tables_before, readings.tables_after, postbacks),
        "redis_memory": None,  # filled in by the waiting-memory step, when the tool owns the workers
    }


def waiting_memory_figures(before: int, after: int, postbacks: int, requests: int) -> dict[str, float | None]:
    """Redis memory that postbacks take while they wait in the inbox (workers stopped)."""
    grown = after - before
    return {
        "postbacks": float(postbacks),
        "requests": float(requests),
        "bytes": float(grown),
        "bytes_per_postback": ratio(grown, postbacks),
        "bytes_per_request": ratio(grown, requests),
    }
