"""Live figures from Redis: the work waiting now, the workers, and the circuits."""

import time
from typing import Any

from rq import Worker
from rq.registry import FailedJobRegistry

from delivery.circuit import OpenCircuit, count_circuits, open_circuits
from postbackproject import inbox, shards
from postbackproject.queue import get_connection, get_queue


def figures() -> dict[str, Any]:
    """Raises RedisError when Redis does not answer."""
    queue = get_queue()
    waiting = inbox.waiting_counts()
    this_minute = int(time.time() // 60 * 60)
    still_open, probe_due = count_circuits(get_connection())
    return {
        "inbox_entries": waiting["entries"],
        "in_delivery": waiting["pending"],
        "scheduled_tries": waiting["due"],
        "failed_jobs": FailedJobRegistry(queue=queue).count,
        "workers": Worker.count(queue=queue),
        "accepted_this_minute": unfolded_accepted().get(this_minute, 0),
        "open_circuits": still_open,
        # Open circuits whose time has passed: their next postback goes out as the probe.
        "probe_due_circuits": probe_due,
    }


def unfolded_accepted() -> dict[int, int]:
    """Accepted postbacks counted by ingestion and not yet folded into the database, per
    minute (Unix time): the current minute, and past ones while no worker folds."""
    connection = get_connection()
    totals: dict[int, int] = {}
    for shard in shards.listed():
        counts: dict[bytes, bytes] = connection.hgetall(shard.accepted)  # type: ignore[assignment]
        for minute, count in counts.items():
            totals[int(minute)] = totals.get(int(minute), 0) + int(count)
    return totals


def circuits() -> dict[str, OpenCircuit]:
    return {circuit.host: circuit for circuit in open_circuits()}
