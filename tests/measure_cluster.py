"""What the inbox's shards cost, and how ingestion rides out a master's failover:
`python -m tests.measure_cluster`, with DATABASE_URL naming a scratch PostgreSQL database, which
it migrates:

    createdb -h 127.0.0.1 -U postgres measure_cluster
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/measure_cluster \
        .venv/bin/python -m tests.measure_cluster 2>measure_cluster.log
    dropdb -h 127.0.0.1 -U postgres measure_cluster

Everything runs in this process, the WSGI application called directly as benchmark/ingest_cpu.py
does, against a redis-server of its own (which also keeps RQ's keys) and a Redis Cluster of three
masters with a replica each (tests/redis_cluster.py), all on loopback:

1. web CPU per ingest of the sample, best of several rounds: one redis-server with one shard and
   with three, and the cluster with three (what the cluster client and the shards' turns add);
2. the same on the cluster with REDIS_WAIT_FOR_REPLICAS=1, CPU and wall time (each 202 waits for
   a replica);
3. Redis CPU per request on each master (INFO cpu and commandstats before and after): whether
   the shards share the requests evenly, and what a request costs a shard's master against the
   single redis-server;
4. a shard's master killed while one thread ingests, with REDIS_WAIT_FOR_REPLICAS=1: the answers
   during the outage and after the failover, and the longest wait for a 202.

The request log (one JSON line per request) goes to stderr. The settings that production reads
once a while (Redis's memory, the delivery settings row) are read as production reads them, not
on every request as the suite does, so that the CPU per request is production's.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
os.environ.setdefault("INGEST_BACKLOG_CHECK_SECONDS", "1")  # production's default, not the suite's 0
os.environ.setdefault("DELIVERY_SETTINGS_CACHE_SECONDS", "5")  # likewise
django.setup()

import itertools  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from redis import Redis  # noqa: E402

from benchmark.ingest_cpu import WSGIApp, call, environ, sample_body, scratch_redis  # noqa: E402
from postbackproject import queue, shards  # noqa: E402
from postbackproject.wsgi import application  # noqa: E402
from tests.redis_cluster import HOST, RedisClusterUnderTest, node_client, start_redis_cluster  # noqa: E402

ACCEPTED = "202 Accepted"
PATH = "/i"
CALLS = 2000  # requests timed in each round
ROUNDS = 5  # the best round counts
WARM_CALLS = 50  # after each switch: new clients connect, scripts load
REDIS_CALLS = 3000  # requests ingested while Redis's CPU is read
SETTLE_SECONDS = 2.0  # steady ingestion before the kill
AFTER_FAILOVER_SECONDS = 5.0
SLOW_SECONDS = 0.1  # requests listed one by one


@dataclass(frozen=True)
class Setup:
    name: str
    shards: int
    cluster: bool
    wait_for_replicas: int = 0


SINGLE_1 = Setup("one redis-server, INBOX_SHARDS=1", 1, False)
SINGLE_3 = Setup("one redis-server, INBOX_SHARDS=3", 3, False)
CLUSTER_3 = Setup("cluster, INBOX_SHARDS=3", 3, True)
CLUSTER_3_WAIT = Setup("cluster, INBOX_SHARDS=3, WAIT 1 replica", 3, True, 1)


def use(setup: Setup, cluster: RedisClusterUnderTest) -> None:
    """Switch this process's settings and build its clients and shard turns again, as a process
    started with those settings would have them."""
    queue.get_connection().close()
    settings.INBOX_SHARDS = setup.shards
    settings.REDIS_CLUSTER_NODES = (
        [(HOST, int(node.rpartition(":")[2])) for node in cluster.nodes.split(",")] if setup.cluster else []
    )
    settings.REDIS_WAIT_FOR_REPLICAS = setup.wait_for_replicas
    queue.forget_connections()
    shards.turns = shards.Turns()


def empty_inbox() -> None:
    """Delete every shard's stream, one key a call (a cluster takes a DEL of one slot's keys only),
    so that INGEST_MAX_QUEUED_JOBS never refuses a round."""
    connection = queue.get_connection()
    for shard in shards.configured():
        connection.delete(shard.inbox)


def ingest(app: WSGIApp, body: bytes, calls: int) -> None:
    for _ in range(calls):
        if (answered := call(app, environ("POST", PATH, body))) != ACCEPTED:
            raise RuntimeError(f"{PATH} answered {answered}, not {ACCEPTED}")


@dataclass
class Cost:
    cpu_us: float = float("inf")
    wall_us: float = float("inf")


def web_costs(app: WSGIApp, cluster: RedisClusterUnderTest, setups: list[Setup]) -> dict[Setup, Cost]:
    """Each set-up's best CPU and best wall time per request over ROUNDS rounds of CALLS; the
    rounds interleave the set-ups, so that a busy moment of the machine weighs on all alike.
    The requests are built before the clock starts, as benchmark/ingest_cpu.py builds them."""
    body = sample_body()
    best = {setup: Cost() for setup in setups}
    for _ in range(ROUNDS):
        for setup in setups:
            use(setup, cluster)
            ingest(app, body, WARM_CALLS)
            empty_inbox()
            requests = [environ("POST", PATH, body) for _ in range(CALLS)]
            cpu, wall = time.process_time(), time.perf_counter()
            for request in requests:
                if (answered := call(app, request)) != ACCEPTED:
                    raise RuntimeError(f"{setup.name}: {PATH} answered {answered}, not {ACCEPTED}")
            cost = best[setup]
            cost.cpu_us = min(cost.cpu_us, (time.process_time() - cpu) / CALLS * 1e6)
            cost.wall_us = min(cost.wall_us, (time.perf_counter() - wall) / CALLS * 1e6)
    return best


@dataclass(frozen=True)
class Reading:
    """A redis-server's CPU (user + sys, s) and its script calls (EVALSHA and EVALSHA_RO)."""

    cpu: float
    script_calls: int
    script_usec: int


def read(client: Redis) -> Reading:
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    scripts = [stats.get(name, {}) for name in ("cmdstat_evalsha", "cmdstat_evalsha_ro")]
    return Reading(
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        sum(int(stat.get("calls", 0)) for stat in scripts),
        sum(int(stat.get("usec", 0)) for stat in scripts),
    )


@dataclass(frozen=True)
class ServerLoad:
    server: str
    requests: float  # requests whose entries this server took
    cpu_us_per_request: float
    idle_cpu_ms_per_s: float  # what the server spends doing nothing (cluster bus, cron)
    script_calls: int
    script_us_per_call: float


def redis_loads(app: WSGIApp, cluster: RedisClusterUnderTest, setup: Setup, single_url: str) -> list[ServerLoad]:
    """Ingest REDIS_CALLS requests and read each server's CPU before and after: on the cluster,
    each master (its share of the requests counted from its shards' streams); else the single
    redis-server. Each server's CPU over a second of idleness is read too: a cluster node pays
    for its bus and cron whatever the load, and that is in the figure per request."""
    use(setup, cluster)
    ingest(app, sample_body(), WARM_CALLS)
    empty_inbox()
    if setup.cluster:
        servers = {f"master :{port}": node_client(port) for port in cluster.masters()}
        holder = {shard.inbox: f"master :{cluster.master_of(shard.inbox)}" for shard in shards.configured()}
    else:
        servers = {"redis-server": Redis.from_url(single_url)}
        holder = {shard.inbox: "redis-server" for shard in shards.configured()}
    idle_from = {name: read(client) for name, client in servers.items()}
    time.sleep(1.0)
    idle = {name: read(client).cpu - idle_from[name].cpu for name, client in servers.items()}
    before = {name: read(client) for name, client in servers.items()}
    ingest(app, sample_body(), REDIS_CALLS)
    after = {name: read(client) for name, client in servers.items()}
    entries = Counter[str]()
    connection = queue.get_connection()
    for inbox, name in holder.items():
        entries[name] += int(connection.xlen(inbox))
    total = sum(entries.values())
    loads = []
    for name in servers:
        requests = REDIS_CALLS * entries[name] / total
        calls = after[name].script_calls - before[name].script_calls
        cpu_us = (after[name].cpu - before[name].cpu) * 1e6
        loads.append(
            ServerLoad(
                name,
                requests,
                cpu_us / requests if requests else float("nan"),
                idle[name] * 1e3,
                calls,
                (after[name].script_usec - before[name].script_usec) / calls if calls else float("nan"),
            )
        )
    return loads


@dataclass(frozen=True)
class Answer:
    started: float  # monotonic
    ended: float
    status: str
    body: bytes


def answer(app: WSGIApp, body: bytes) -> Answer:
    """One request, its status and body (why a 503 was given)."""
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        status.append(line)
        return lambda data: None

    started = time.monotonic()
    result = app(environ("POST", PATH, body), start_response)
    content = b"".join(result)
    getattr(result, "close", lambda: None)()
    return Answer(started, time.monotonic(), status[0], content)


@dataclass
class Failover:
    victim: int  # port of the master killed
    killed_at: float
    failed_over_at: float
    answers: list[Answer]


def failover(app: WSGIApp, cluster: RedisClusterUnderTest) -> Failover:
    """One thread ingests in a loop; shard 1's master is killed after SETTLE_SECONDS, and the
    loop goes on until the cluster has failed over and AFTER_FAILOVER_SECONDS more."""
    use(CLUSTER_3_WAIT, cluster)
    empty_inbox()
    victim = cluster.master_of(shards.configured()[1].inbox)
    body = sample_body()
    answers: list[Answer] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            answers.append(answer(app, body))

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        time.sleep(SETTLE_SECONDS)
        killed_at = time.monotonic()
        cluster.kill(victim)
        cluster.wait_for_failover(victim)
        failed_over_at = time.monotonic()
        time.sleep(AFTER_FAILOVER_SECONDS)
    finally:
        stop.set()
        thread.join()
    return Failover(victim, killed_at, failed_over_at, answers)


def print_web(costs: dict[Setup, Cost]) -> None:
    print(f"Web CPU per ingest request ({PATH}, the sample; best of {ROUNDS} rounds of {CALLS}, in-process)")
    print(f"{'set-up':42} {'CPU µs/req':>11} {'wall µs/req':>12}")
    for setup, cost in costs.items():
        print(f"{setup.name:42} {cost.cpu_us:11.1f} {cost.wall_us:12.1f}")


def print_redis(setup: Setup, loads: list[ServerLoad]) -> None:
    print(f"Redis CPU while ingesting {REDIS_CALLS} requests: {setup.name}")
    header = f"{'server':18} {'requests':>8} {'CPU µs/req':>11} {'idle CPU ms/s':>14}"
    print(f"{header} {'EVALSHA calls':>14} {'EVALSHA µs/call':>16}")
    for load in loads:
        row = f"{load.server:18} {load.requests:8.0f} {load.cpu_us_per_request:11.1f} {load.idle_cpu_ms_per_s:14.1f}"
        print(f"{row} {load.script_calls:14} {load.script_us_per_call:16.1f}")


def print_failover(seen: Failover) -> None:
    outage = seen.failed_over_at - seen.killed_at
    print(f"Failover: master :{seen.victim} of shard 1 killed; slots served again after {outage:.2f} s")
    periods = [
        (f"before the kill ({SETTLE_SECONDS:.0f} s)", float("-inf"), seen.killed_at),
        (f"outage ({outage:.2f} s)", seen.killed_at, seen.failed_over_at),
        (f"after ({AFTER_FAILOVER_SECONDS:.0f} s)", seen.failed_over_at, float("inf")),
    ]
    print(f"{'period':24} {'202':>6} {'not 202':>8} {'slowest ms':>11}")
    for name, start, end in periods:
        within = [item for item in seen.answers if start <= item.started < end]
        accepted = sum(item.status == ACCEPTED for item in within)
        slowest = max(((item.ended - item.started) * 1e3 for item in within), default=0.0)
        print(f"{name:24} {accepted:6} {len(within) - accepted:8} {slowest:11.1f}")
    ends = [item.ended for item in seen.answers if item.status == ACCEPTED]
    gap, at = max(((later - earlier, earlier) for earlier, later in itertools.pairwise(ends)), default=(0.0, 0.0))
    print(f"longest gap between two 202s: {gap * 1e3:.0f} ms, from {at - seen.killed_at:+.2f} s after the kill")
    print(f"requests of {SLOW_SECONDS * 1e3:.0f} ms or more:")
    for item in seen.answers:
        if (took := item.ended - item.started) >= SLOW_SECONDS:
            print(f"  {took * 1e3:.0f} ms, {item.status[:3]}, at {item.started - seen.killed_at:+.2f} s after the kill")
    refused: dict[str, list[float]] = {}
    for item in seen.answers:
        if item.status != ACCEPTED:
            why = f"{item.status} {item.body.decode(errors='replace')}"
            refused.setdefault(why, []).append(item.started - seen.killed_at)
    for why, times in refused.items():
        when = ", ".join(f"{at:+.2f}" for at in times[:12]) + (", ..." if len(times) > 12 else "")
        print(f"{len(times)} x {why}\n  at {when} s after the kill")


def main() -> None:
    call_command("migrate", verbosity=0)
    with scratch_redis() as url:
        # Before the process's Redis clients are first built (postbackproject.queue, lazily).
        settings.REDIS_URL = url
        cluster = start_redis_cluster()
        try:
            print_web(web_costs(application, cluster, [SINGLE_1, SINGLE_3, CLUSTER_3, CLUSTER_3_WAIT]))
            for setup in (SINGLE_1, CLUSTER_3):
                print()
                print_redis(setup, redis_loads(application, cluster, setup, url))
            print()
            print_failover(failover(application, cluster))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
