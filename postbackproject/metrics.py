"""Prometheus metrics: counters from every process, gauges read from Redis at scrape time.

Web and worker processes count in prometheus-client's multiprocess mode: each writes its
counts to files in PROMETHEUS_MULTIPROC_DIR (the same folder for all of them, emptied at boot;
`postbackproject.metricsdir` gives it a default), and `/metrics`, served by any web process,
adds them up. Without that variable (a folder that cannot be written), counts stay in the
process. What describes the shared state (the backlog,
retries waiting, workers, open circuits, Redis memory, readiness) is read when Prometheus
scrapes, not counted.
"""

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from delivery.circuit import count_circuits
from postbackproject import inbox, keys
from postbackproject.queue import fullest_master_memory, get_connection, get_queue_connection

INGESTED = Counter("postback_ingested", "Postbacks accepted by ingestion (answered 202).")
INGEST_REJECTED = Counter(
    "postback_ingest_rejected", "Ingest requests refused, by HTTP status (400, 401, 405, 413, 429, 503).", ["status"]
)
DELIVERY_ATTEMPTS = Counter(
    "postback_delivery_attempts", "Delivery attempts by outcome: success, retry, failed.", ["outcome"]
)
DELIVERY_DEFERRALS = Counter(
    "postback_delivery_deferrals", "Tries not sent because their host's circuit was open (no attempt used)."
)
DELIVERY_DURATION = Histogram(
    "postback_delivery_duration_seconds",
    "Time from the start of a delivery request to the last byte of its reply (or its failure).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class SharedStateCollector(Collector):
    """Gauges read from Redis (and the database, for readiness) when Prometheus scrapes."""

    def __init__(self, queue_name: str, ready: Callable[[], bool]) -> None:
        self.queue_name = queue_name
        self.ready = ready

    def collect(self) -> Iterator[Metric]:
        try:
            connection = get_connection()
            by_shard = inbox.waiting_by_shard()
            workers = get_queue_connection().scard(keys.queue_workers(self.queue_name))
            circuits_open, probes_due = count_circuits(connection)
            memory = fullest_master_memory(connection)
        except RedisError:
            yield gauge("postback_redis_up", "1 when Redis answered this scrape.", 0)
            yield gauge("postback_ready", "1 when /readyz would answer 200.", 0)
            return
        yield gauge("postback_redis_up", "1 when Redis answered this scrape.", 1)
        depth = sum(counts["entries"] for counts in by_shard.values())
        due = sum(counts["due"] for counts in by_shard.values())
        yield gauge("postback_queue_depth", "Inbox entries waiting or being delivered.", depth)
        shard_depth = GaugeMetricFamily(
            "postback_inbox_shard_depth", "Entries waiting or being delivered in each inbox shard.", labels=["shard"]
        )
        for shard, counts in sorted(by_shard.items()):
            shard_depth.add_metric([shard], counts["entries"])
        yield shard_depth
        yield gauge("postback_scheduled_retries", "Postbacks waiting for a later try (retries, deferrals).", due)
        yield gauge("postback_workers", "RQ workers registered for the queue.", workers)
        yield gauge(
            "postback_circuits_open", "Destination hosts whose circuit is open (their postbacks wait).", circuits_open
        )
        yield gauge(
            "postback_circuits_probe_due",
            "Destination hosts whose circuit's open time has passed: the next postback for one goes out as its probe.",
            probes_due,
        )
        # On a cluster: the master nearest its cap (the one that would refuse writes first).
        yield gauge("postback_redis_used_memory_bytes", "Memory Redis uses.", int(memory.get("used_memory", 0)))
        yield gauge("postback_redis_maxmemory_bytes", "Redis's memory cap (0: none).", int(memory.get("maxmemory", 0)))
        yield gauge("postback_ready", "1 when /readyz would answer 200.", int(self.ready()))


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def exposition(shared: Collector) -> bytes:
    """Every process's counters, and the shared state, in Prometheus's text format."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for collector in (INGESTED, INGEST_REJECTED, DELIVERY_ATTEMPTS, DELIVERY_DEFERRALS, DELIVERY_DURATION):
            registry.register(collector)
    registry.register(shared)
    return generate_latest(registry)


def forget_process(pid: int) -> None:
    """A process that ended: its live gauges go (its counts stay in the totals)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
