"""What the tool watches while a scenario runs: attempt rows, queue lengths, every process's
RSS and CPU time, requests in flight at the receivers, and the backlog (accepted so far minus
those with a final outcome so far: delivered, or failed for good), on the tool's main thread.

Only cheap Redis commands are sent each second (LLEN, ZCARD, XLEN), so that the tool's own
traffic stays out of the bytes-per-postback figure; INFO is read once before and once after.
"""

import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import psutil
from django.conf import settings
from redis import Redis

from benchmark.database import AttemptLog, AttemptRow
from benchmark.loadgen import ACCEPTED, SharedCounters
from benchmark.metrics import cpu_seconds
from postbackproject.keys import DUE, INBOX

POLL_SECONDS = 0.5
RSS_SECONDS = 0.5
SAMPLE_SECONDS = 1.0


def queue_keys() -> dict[str, tuple[str, str]]:
    """Queue lengths worth watching: name -> (Redis type, key). Missing keys read as 0."""
    queue = settings.POSTBACK_QUEUE
    return {
        "rq_queue": ("list", f"rq:queue:{queue}"),
        "rq_scheduled": ("zset", f"rq:scheduled:{queue}"),
        "inbox": ("stream", INBOX),  # the benchmark runs one shard on one Redis
        "due": ("zset", DUE),
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
        counters: Sequence[SharedCounters],
        processes: dict[str, int],
        service: set[str] | None = None,
    ) -> None:
        self.redis = redis
        self.attempts = attempts
        self.counters = list(counters)
        self.processes = {name: psutil.Process(pid) for name, pid in processes.items()}
        self.service = set(processes) if service is None else set(service)  # whose CPU is the service's
        self.in_flight: Callable[[], int] | None = None  # requests in flight at the receivers
        self.rows: list[AttemptRow] = []
        self.final_seen_at: dict[str, float] = {}
        self.delivered: set[str] = set()
        self.samples: list[dict[str, float]] = []
        self.rss: dict[str, list[tuple[float, float]]] = defaultdict(list)
        # CPU seconds (user + system) per process: the first and the latest reading.
        self.cpu: dict[str, tuple[float, float]] = {}
        self.exited: dict[str, float] = {}  # process -> when it was found gone
        self.started = time.time()
        self._next_poll = self._next_rss = self._next_sample = 0.0

    @property
    def accepted(self) -> int:
        return sum(int(counters[ACCEPTED]) for counters in self.counters)

    def tick(self) -> None:
        """Do whatever is due; call it often (every 0.1-0.2 s)."""
        now = time.monotonic()
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_SECONDS
            self._next_poll = now + POLL_SECONDS
            self.sample_queues()  # polls the attempt log itself
        if now >= self._next_poll:
            self._next_poll = now + POLL_SECONDS
            self.poll_attempts()
        if now >= self._next_rss:
            self._next_rss = now + RSS_SECONDS
            self.sample_processes()

    def finish(self) -> None:
        """The last readings, once the wait is over."""
        self.poll_attempts()
        self.sample_processes()

    def poll_attempts(self) -> None:
        seen = time.time()
        for row in self.attempts.poll():
            self.rows.append(row)
            if row.outcome in ("success", "failed"):
                self.final_seen_at.setdefault(row.postback_id, seen)
            if row.outcome == "success":
                self.delivered.add(row.postback_id)

    def sample_processes(self) -> None:
        """RSS and CPU time of every process watched (gunicorn's workers too: they come and go)."""
        now = time.time()
        for name, process in list(self.processes.items()):
            try:
                self.read(name, process, now)
                if name == "web":  # gunicorn's workers come and go (max_requests): follow them
                    for child in process.children():
                        self.read(f"web/{child.pid}", child, now, born_after=self.started)
            except psutil.Error:  # it exited: nobody but the kill scenario (which forgets it first) may do that
                del self.processes[name]
                self.exited[name] = now

    def read(self, name: str, process: psutil.Process, now: float, born_after: float | None = None) -> None:
        with process.oneshot():
            self.rss[name].append((now, float(process.memory_info().rss)))
            used = cpu_seconds(process)
            if name not in self.cpu:
                # A process started during the run (a new gunicorn worker) counts from zero.
                first = 0.0 if born_after is not None and process.create_time() >= born_after else used
                self.cpu[name] = (first, used)
            self.cpu[name] = (self.cpu[name][0], used)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds each process used between its first reading and its last."""
        return {name: last - first for name, (first, last) in self.cpu.items()}

    def service_names(self) -> list[str]:
        """The processes read that are the service's (gunicorn's workers under `web/`)."""
        return sorted(name for name in self.cpu if name.split("/")[0] in self.service)

    def sample_queues(self) -> None:
        """The backlog now: accepted as counted live, final as the attempt log says just after.

        Reading the log right here (not on its own half-second timer) keeps the two counts of
        one sample at the same instant: a final count up to 0.5 s older than the accepted one
        showed, at 2,000 postbacks/s, up to 1,000 postbacks of "backlog" that were not there.
        """
        accepted = self.accepted
        self.poll_attempts()
        final = len(self.final_seen_at)
        sample: dict[str, float] = {"time": time.time(), "accepted": accepted, "delivered": len(self.delivered)}
        sample["final"] = final
        sample["backlog"] = accepted - final
        if self.in_flight is not None:
            sample["receivers_in_flight"] = self.in_flight()
        sample.update(queue_lengths(self.redis))
        self.samples.append(sample)

    def all_final(self, ids: Sequence[str]) -> bool:
        return all(pid in self.final_seen_at for pid in ids)

    def forget(self, name: str) -> None:
        self.processes.pop(name, None)
