"""What the tool watches while a scenario runs: attempt rows, queue lengths, every process's
RSS, and the backlog (accepted so far minus those with a final outcome so far: delivered, or
failed for good), on the tool's main thread.

Only cheap Redis commands are sent each second (LLEN, ZCARD, XLEN), so that the tool's own
traffic stays out of the bytes-per-postback figure; INFO is read once before and once after.
"""

import time
from collections import defaultdict
from collections.abc import Sequence

import psutil
from django.conf import settings
from redis import Redis

from benchmark.database import AttemptLog, AttemptRow
from benchmark.loadgen import ACCEPTED, SharedCounters

POLL_SECONDS = 0.5
RSS_SECONDS = 0.5
SAMPLE_SECONDS = 1.0


def queue_keys() -> dict[str, tuple[str, str]]:
    """Queue lengths worth watching: name -> (Redis type, key). Missing keys read as 0."""
    queue = settings.POSTBACK_QUEUE
    return {
        "rq_queue": ("list", f"rq:queue:{queue}"),
        "rq_scheduled": ("zset", f"rq:scheduled:{queue}"),
        "inbox": ("stream", "postback:inbox"),
        "due": ("zset", "postback:due"),
    }


def queue_lengths(redis: Redis) -> dict[str, int]:
    keys = queue_keys()
    with redis.pipeline(transaction=False) as pipe:
        for kind, key in keys.values():
            if kind == "list":
                pipe.llen(key)
            elif kind == "zset":
                pipe.zcard(key)
            else:
                pipe.exists(key)
        replies = pipe.execute()
    lengths = dict(zip(keys, (int(reply) for reply in replies), strict=True))
    if lengths["inbox"]:  # XLEN only where the stream exists (the engine may not use one)
        lengths["inbox"] = int(redis.xlen(keys["inbox"][1]))
    return lengths


def redis_stats(redis: Redis) -> dict[str, int]:
    stats = redis.info("stats")
    names = ("total_net_input_bytes", "total_net_output_bytes", "total_commands_processed")
    return {name: int(stats.get(name, 0)) for name in names}


class Monitor:
    def __init__(
        self,
        redis: Redis,
        attempts: AttemptLog,
        counters: SharedCounters,
        processes: dict[str, int],
    ) -> None:
        self.redis = redis
        self.attempts = attempts
        self.counters = counters
        self.processes = {name: psutil.Process(pid) for name, pid in processes.items()}
        self.rows: list[AttemptRow] = []
        self.final_seen_at: dict[str, float] = {}
        self.delivered: set[str] = set()
        self.samples: list[dict[str, float]] = []
        self.rss: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.exited: dict[str, float] = {}  # process -> when it was found gone
        self._next_poll = self._next_rss = self._next_sample = 0.0

    @property
    def accepted(self) -> int:
        return int(self.counters[ACCEPTED])

    def tick(self) -> None:
        """Do whatever is due; call it often (every 0.1-0.2 s)."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + POLL_SECONDS
            self.poll_attempts()
        if now >= self._next_rss:
            self._next_rss = now + RSS_SECONDS
            self.sample_rss()
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_SECONDS
            self.sample_queues()

    def poll_attempts(self) -> None:
        seen = time.time()
        for row in self.attempts.poll():
            self.rows.append(row)
            if row.outcome in ("success", "failed"):
                self.final_seen_at.setdefault(row.postback_id, seen)
            if row.outcome == "success":
                self.delivered.add(row.postback_id)

    def sample_rss(self) -> None:
        now = time.time()
        for name, process in list(self.processes.items()):
            try:
                self.rss[name].append((now, float(process.memory_info().rss)))
                if name == "web":  # gunicorn's workers come and go (max_requests): follow them
                    for child in process.children():
                        self.rss[f"web/{child.pid}"].append((now, float(child.memory_info().rss)))
            except psutil.Error:  # it exited: nobody but the kill scenario (which forgets it first) may do that
                del self.processes[name]
                self.exited[name] = now

    def sample_queues(self) -> None:
        accepted, final = self.accepted, len(self.final_seen_at)
        sample: dict[str, float] = {"time": time.time(), "accepted": accepted, "delivered": len(self.delivered)}
        sample["final"] = final
        sample["backlog"] = accepted - final
        sample.update(queue_lengths(self.redis))
        self.samples.append(sample)

    def all_final(self, ids: Sequence[str]) -> bool:
        return all(pid in self.final_seen_at for pid in ids)

    def forget(self, name: str) -> None:
        self.processes.pop(name, None)
