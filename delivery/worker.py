"""The RQ worker that `manage.py rqworker` builds (settings.RQ["WORKER_CLASS"])."""

import logging
import resource
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, close_old_connections
from django_rq.queues import DjangoRQ
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import OutOfMemoryError, RedisError
from rq import Queue, SimpleWorker
from rq.job import Job

from delivery import collector, partitions
from delivery.drain import request_stop
from delivery.full_redis import unless_redis_is_full
from delivery.rollups import fold_accepted_now_and_then
from delivery.transport import connection_cache_size
from postbackproject.inbox import sweep
from postbackproject.postback import DRAIN
from postbackproject.queue import CompactJSONSerializer

logger = logging.getLogger(__name__)

# How long a worker waits for Redis to come back after it failed mid-job, before giving up
# (and exiting, for systemd to start it again).
REDIS_OUTAGE_SECONDS = 300
# Longest pause between tries to take a job while Redis is full (it waits as long as it takes).
REDIS_FULL_PAUSE_MAX_SECONDS = 5.0


# Descriptors a worker needs beside its connections to receivers: Redis, the database, the
# resolver's wake-up pipe, logs, and a margin.
OTHER_DESCRIPTORS = 128


# The only functions a worker runs. RQ imports and calls whatever a job names, so whoever can
# write to Redis could name os.system: a job naming anything else fails without running.
JOB_FUNCTIONS = frozenset({DRAIN})


class RefusedJob(Exception):
    """A job that names a function, instance or callback that workers do not run."""


class DeliveryJob(Job):
    """A job as this service's workers take it: one of JOB_FUNCTIONS, on no instance, with no
    callbacks (the service sets none, so any found in Redis were put there by someone else)."""

    @property
    def func(self) -> Callable[..., Any] | None:
        if self.func_name not in JOB_FUNCTIONS or self.instance is not None:
            logger.error("refused job %s: it names %r, which workers do not run", self.id, self.func_name)
            raise RefusedJob(f"job {self.id} names {self.func_name!r}, which workers do not run")
        function: Callable[..., Any] | None = super().func
        return function

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None


class DeliveryQueue(DjangoRQ):
    """The queue as a worker sees it: every look for a job first sweeps the inbox.

    The sweep moves retries that came due into the inbox and starts a drainer when work waits
    that nobody will read (a web process died before starting one, or a drainer died). Idle
    workers look every DELIVERY_WORKER_POLL_SECONDS, so that is how late a retry can be. Now
    and then the look also folds the counts of accepted postbacks into the database.
    """

    @classmethod
    def dequeue_any(  # type: ignore[override]  # same arguments, passed on as they came
        cls, queues: Iterable[Queue], timeout: int | None, connection: Redis, **kwargs: Any
    ) -> tuple[Job, Queue] | None:
        collector.collect_when_due()
        try:
            sweep()
            fold_accepted_now_and_then()
        except RedisError as exc:
            logger.warning("inbox sweep failed: %s", exc)  # the dequeue below reports Redis trouble
        except DatabaseError as exc:
            logger.warning("folding accepted counts failed: %s", exc)  # they wait in Redis
        return super().dequeue_any(queues, timeout, connection=connection, **kwargs)


def descriptors_needed(concurrency: int, idle: int) -> int:
    """Open files a worker may need: every connection libcurl may keep, and the rest."""
    return connection_cache_size(concurrency, idle) + OTHER_DESCRIPTORS


def ensure_descriptor_limit(concurrency: int, idle: int) -> int:
    """Raise this process's open-file limit to what DELIVERY_CONCURRENCY and
    DELIVERY_IDLE_CONNECTIONS need, within the hard limit; refuse to start when the hard limit
    is lower (past it, every new connection would fail with "Too many open files" under load,
    long after the start). Returns the limit."""
    needed = descriptors_needed(concurrency, idle)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ImproperlyConfigured(
            f"DELIVERY_CONCURRENCY={concurrency} and DELIVERY_IDLE_CONNECTIONS={idle} need up to {needed} "
            f"open files, but this process may open at most {hard} (ulimit -Hn). Raise the limit "
            f"(LimitNOFILE= in the systemd unit, ulimit -n in a shell) or lower those settings."
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    logger.info(
        "open-file limit raised from %d to %d for %d connections in flight, %d idle", soft, needed, concurrency, idle
    )
    return needed


class DeliveryWorker(SimpleWorker):
    """Runs jobs in its own process, without a fork per job.

    A fork per job would throw away the keep-alive connections that make delivery fast, and
    costs more than a delivery on loopback. Database connections are checked between jobs, so
    a database restart costs one failed job at most, not a dead worker.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # `rqworker` passes its own --serializer (pickle by default), queue and job classes;
        # jobs are JSON (pickle would run code as it loads), only ours run, and the queue
        # sweeps the inbox.
        kwargs["serializer"] = CompactJSONSerializer
        kwargs["queue_class"] = DeliveryQueue
        kwargs["job_class"] = DeliveryJob
        ensure_descriptor_limit(settings.DELIVERY_CONCURRENCY, settings.DELIVERY_IDLE_CONNECTIONS)
        collector.take_over_from_the_allocation_counter()
        super().__init__(*args, **kwargs)

    def _start_scheduler(self, *args: Any, **kwargs: Any) -> None:
        """`--with-scheduler` is accepted and needs nothing: delayed tries wait in the inbox's
        due set, which every worker sweeps. RQ's scheduler would be one more process per
        worker, and one that inherits the worker's Redis connections: after the worker is
        SIGKILLed it keeps the worker's blocking read alive, and that read takes the next job."""
        self.log.info("Worker %s: retries are scheduled by the inbox; RQ's scheduler is not needed", self.name)

    @property
    def dequeue_timeout(self) -> int:
        return max(1, round(settings.DELIVERY_WORKER_POLL_SECONDS))

    def execute_job(self, job: Job, queue: Queue) -> None:
        close_old_connections()
        try:
            super().execute_job(job, queue)
        except RedisError as exc:
            # Redis went away mid-job (a failover, a restart), or refused RQ's bookkeeping of
            # the job for being full; left alone, RQ's loop would quit on its next heartbeat.
            # The job's postbacks are safe in the inbox: wait for Redis (or the new master),
            # carry on (a full Redis is waited out where the next job is taken).
            self.log.error("Worker %s: Redis failed during job %s: %s; waiting for it", self.name, job.id, exc)
            self.wait_for_redis()
        finally:
            close_old_connections()

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's heartbeat, skipped while Redis is full (RQ's loop would quit on the refusal; the
        worker's key outlives a few missed beats: worker_ttl + 60 s)."""
        beat = super().heartbeat
        if pipeline is not None:
            beat(timeout, pipeline)
        else:
            unless_redis_is_full(lambda: beat(timeout), f"worker {self.name}'s heartbeat")

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's check for `rq suspend` (it beats the heart too): while Redis is full, not
        suspended."""
        check = super().check_for_suspension
        unless_redis_is_full(lambda: check(burst), f"worker {self.name}'s check for suspension")

    def run_maintenance_tasks(self) -> None:
        unless_redis_is_full(super().run_maintenance_tasks, f"worker {self.name}'s maintenance of RQ's registries")

    def register_birth(self) -> None:
        """RQ's registration, waiting while Redis is full: a worker started then (by systemd
        after a crash, say) waits for room instead of exiting into the same refusal again."""
        self.when_redis_has_room(super().register_birth, "register")
        partitions.make_ahead_if_possible()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """The next job, waiting while Redis is full (taking a job writes; RQ's loop would quit
        on the refusal): once workers and drainers free memory, or an operator makes room, it
        goes on. A stop requested meanwhile ends the wait (None: no job)."""
        return self.when_redis_has_room(
            lambda: super(DeliveryWorker, self).dequeue_job_and_maintain_ttl(timeout, max_idle_time), "take a job"
        )

    def when_redis_has_room(self, call: Callable[[], Any], what: str) -> Any:
        """`call`'s result, tried again with a growing pause while Redis refuses it for being
        full; None once a stop is requested meanwhile."""
        pause = 0.5
        while True:
            try:
                return call()
            except OutOfMemoryError:
                if self._stop_requested:
                    return None
                self.log.warning("Worker %s: Redis is full; waiting %.1f s for room to %s", self.name, pause, what)
                time.sleep(pause)
                pause = min(2 * pause, REDIS_FULL_PAUSE_MAX_SECONDS)

    def wait_for_redis(self) -> None:
        """Until Redis answers again, retrying every second or so (REDIS_OUTAGE_SECONDS at most)."""
        deadline = time.monotonic() + REDIS_OUTAGE_SECONDS
        while True:
            try:
                self.connection.ping()
                return
            except RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def handle_warm_shutdown_request(self) -> None:
        """SIGTERM: the drain job in hand stops reading, finishes its requests and hands over."""
        super().handle_warm_shutdown_request()  # type: ignore[no-untyped-call]
        request_stop()
