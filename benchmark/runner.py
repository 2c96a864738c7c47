"""Runs one scenario: receivers, service, settings, baselines, load, the wait for every
postback's final outcome, and the figures."""

import contextlib
import json
import math
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import psutil
from django.conf import settings
from rich.progress import Progress

from benchmark import baselines, payloads, php
from benchmark.costs import (
    CostReadings,
    analyze,
    redis_counters,
    table_counts,
    used_memory,
    waiting_memory_figures,
)
from benchmark.database import (
    AttemptLog,
    apply_settings,
    close_database,
    current_settings,
    open_database,
    restore_settings,
)
from benchmark.destinations import Destinations, StartContext
from benchmark.figures import RawRun, group_figures, summarize
from benchmark.loadgen import LoadPlan, LoadProcess, LoadResult, new_counters
from benchmark.monitor import Monitor, redis_stats
from benchmark.scenarios import Phase, Scenario
from benchmark.service import WORKERS_KEY, Service, ServiceExtras

TICK_SECONDS = 0.1
RQ_NOOP_JOBS = 2000
# Postbacks sent with the workers stopped, to weigh what one takes in Redis while it waits.
WAITING_POSTBACKS = 4000


class ServiceProvider(Protocol):
    """Gives each scenario a service: a fresh one of the tool's own, or the running one."""

    starts_service: bool

    def start(self, name: str, extras: ServiceExtras | None = None) -> Service: ...

    def stop(self, service: Service) -> None: ...


@dataclass
class RunSettings:
    max_wait: float | None  # None: the scenario's own (DEFAULT_WAIT_SECONDS unless it says)
    workers: int
    concurrency: int
    receiver_processes: int | None = None  # None: each scenario's own (1; `wild`: 2)
    ingest_path: str = "/ingest.php"
    baseline_seconds: float = 10.0  # longest a timed baseline runs (/healthz, plain client)
    workdir: Path = Path("/tmp")  # scratch space for the scenarios' receivers
    skip_ceiling: bool = False  # leave out the receivers' ceilings (wild's too)
    web_workers: int = 2  # gunicorn processes: the PHP baseline's `equal` pool has as many children
    php_pools: tuple[str, ...] = ()  # the PHP baseline's pools (benchmark/php.py)


def plan_for(phase: Phase, service: Service, destinations: Destinations, ingest_path: str) -> LoadPlan:
    """The phase's load: one body per URL base of its destination, cycled."""
    bodies = [
        payloads.sample(base)
        if phase.objects is None
        else payloads.body(base + payloads.SAMPLE_PATH, payloads.objects(phase.objects))
        for base in destinations.bases(phase.receiver)
    ]
    return LoadPlan(
        url=service.url + ingest_path,
        bodies=bodies,
        rate=phase.rate,
        schedule=phase.schedule,
        clients=phase.clients,
        duration=phase.duration,
        requests=phase.requests,
    )


@contextlib.contextmanager
def started(scenario: Scenario, context: StartContext) -> Iterator[Destinations]:
    destinations = scenario.destinations.start(context)
    try:
        yield destinations
    finally:
        destinations.stop()  # a second stop (after the figures took the receipts) is a no-op


class ScenarioRun:
    def __init__(self, scenario: Scenario, provider: ServiceProvider, options: RunSettings, progress: Progress) -> None:
        self.scenario = scenario
        self.provider = provider
        self.settings = options
        self.progress = progress
        self.task = progress.add_task(scenario.name, total=None, accepted=0, delivered=0, backlog=0)
        self.started = 0.0  # the first send (Unix time)
        self.kill_at: float | None = None
        self.described: dict[str, Any] = {}  # the destinations, as they were at the end of the load

    def run(self) -> dict[str, Any]:
        self.say("starting")
        context = StartContext(
            workdir=self.settings.workdir / self.scenario.name,
            receiver_processes=self.settings.receiver_processes,
            local_service=self.provider.starts_service,
        )
        with started(self.scenario, context) as destinations:
            service = self.provider.start(self.scenario.name, destinations.service_extras())
            alias = open_database(service.database_url)
            previous = current_settings(alias)
            try:
                applied = apply_settings(alias, self.scenario.settings)
                time.sleep(service.settings_cache_seconds + 0.2)  # every process now reads the new row
                measured = self.baselines(service, destinations)
                raw = self.drive(service, alias, destinations)
                raw.extra = {name: group_figures(raw, index) for name, index in self.scenario.groups.items()}
                figures = summarize(raw)
                figures["costs"]["redis_memory"] = self.waiting_memory(service, destinations)
            finally:
                restore_settings(alias, previous)
                close_database(alias)
                self.provider.stop(service)
        figures.update(
            title=self.scenario.title,
            load=[phase.describe() for phase in self.scenario.phases],
            receivers=self.described,
            settings=applied,
            baselines=measured,
            workers=self.settings.workers,
            concurrency=self.settings.concurrency,
        )
        return figures

    # --- baselines ---------------------------------------------------------------------------

    def baselines(self, service: Service, destinations: Destinations) -> dict[str, float]:
        measured: dict[str, float] = {}
        phase = self.scenario.phases[0]
        wanted = self.scenario.baselines
        if "healthz" in wanted:
            self.say("baseline /healthz")
            seconds = min(phase.duration or self.settings.baseline_seconds, self.settings.baseline_seconds)
            measured["healthz_requests_per_second"] = baselines.healthz_requests_per_second(
                service.url, phase.clients, seconds
            )
        if "php" in wanted:
            measured.update(self.php_baselines(service, destinations))
        if "plain" in wanted:
            self.say("baseline plain client")
            url = destinations.bases(phase.receiver)[0] + "/data?key=k&value=v&foo="
            measured["plain_client_requests_per_second"] = baselines.plain_client_requests_per_second(
                url, min(self.settings.concurrency, baselines.PLAIN_CLIENT_THREADS), self.settings.baseline_seconds / 2
            )
        if "rq" in wanted:
            self.say("baseline RQ no-op")
            measured["rq_noop_jobs_per_second"] = baselines.rq_noop_jobs_per_second(
                service.redis_url, self.settings.workers, RQ_NOOP_JOBS
            )
        if "receivers" in wanted and not self.settings.skip_ceiling:
            self.say("receivers' ceiling")
            measured.update(destinations.ceiling(min(3.0, self.settings.baseline_seconds)))
        return measured

    def php_baselines(self, service: Service, destinations: Destinations) -> dict[str, float]:
        """The same load on the brief's stack, written minimal, with the same Redis: one figure
        a pool (benchmark/php.py)."""
        phase = self.scenario.phases[0]
        seconds = min(phase.duration or self.settings.baseline_seconds, self.settings.baseline_seconds)
        plan = replace(plan_for(phase, service, destinations, "/ingest.php"), duration=seconds, requests=None)
        measured = {}
        for pool in self.settings.php_pools:
            self.say(f"baseline PHP ({pool})")
            scratch = self.settings.workdir.parent / f"php-{self.scenario.name}-{pool}"
            scratch.mkdir(parents=True, exist_ok=True)
            measured[f"php_{pool}_requests_per_second"] = baselines.php_requests_per_second(
                scratch, pool, self.settings.web_workers, service.redis_url, plan
            )
            measured[f"php_{pool}_children"] = php.children_of(pool, self.settings.web_workers)
        return measured

    # --- the load and the wait -----------------------------------------------------------------

    def drive(self, service: Service, alias: str, destinations: Destinations) -> RawRun:
        redis = service.redis()
        counters = [new_counters() for _ in self.scenario.phases]
        processes = {**service.processes(), **destinations.pids()}
        monitor = Monitor(redis, AttemptLog(alias), counters, processes, set(service.processes()))
        monitor.in_flight = destinations.in_flight
        analyze(alias)
        before = redis_stats(redis)
        redis_before, tables_before = redis_counters(redis), table_counts(alias)
        self.started = time.time()
        plans = [plan_for(phase, service, destinations, self.settings.ingest_path) for phase in self.scenario.phases]
        if self.scenario.together:
            self.say("load")
            loads = self.run_loads([LoadProcess(plan, counters[i]) for i, plan in enumerate(plans)], service, monitor)
        else:
            loads = []
            for index, plan in enumerate(plans):
                self.say(f"load {index + 1}/{len(plans)}" if len(plans) > 1 else "load")
                loads += self.run_loads([LoadProcess(plan, counters[index])], service, monitor)
        started = min(load.started for load in loads)
        load_ended = max(load.ended for load in loads)
        ids = [pid for load in loads for _, _, _, batch in load.records for pid in batch]
        timed_out = self.wait_for_outcomes(monitor, ids)
        monitor.finish()
        self.described = destinations.describe()
        after = redis_stats(redis)
        costs = CostReadings(redis_before, redis_counters(redis), tables_before, table_counts(alias))
        ended = time.time()
        return RawRun(
            name=self.scenario.name,
            started=started,
            load_ended=load_ended,
            ended=ended,
            wait_timed_out=timed_out,
            loads=loads,
            receipts=destinations.stop(),
            attempts=monitor.rows,
            final_seen_at=monitor.final_seen_at,
            final_at=monitor.attempts.final_times(),
            redis_before=before,
            redis_after=after,
            rss=dict(monitor.rss),
            cpu=monitor.cpu_seconds(),
            service_processes=monitor.service_names(),
            samples=monitor.samples,
            kill_at=self.kill_at,
            exited=monitor.exited,
            costs=costs,
        )

    def waiting_memory(self, service: Service, destinations: Destinations) -> dict[str, float | None] | None:
        """Redis memory per postback waiting: the workers stopped (SIGSTOP), the scenario's
        request sent until WAITING_POSTBACKS are accepted, used_memory before and after, the
        workers let go again. Only with the tool's own workers (not with --url), in the scenarios
        that ask for it."""
        if not service.owned or not self.scenario.waiting_memory:
            return None
        # Idle drain jobs end first, so that no stopped drainer is handed the entries to hold.
        time.sleep(settings.DELIVERY_DRAINER_IDLE_SECONDS + 1.0)
        phase = self.scenario.phases[0]
        body = plan_for(phase, service, destinations, self.settings.ingest_path).bodies[0]
        requests = math.ceil(WAITING_POSTBACKS / (phase.objects or len(payloads.SAMPLE_DATA)))
        redis = service.redis()
        workers = [psutil.Process(child.pid) for child in service.workers() if child.alive()]
        self.say("Redis memory, workers stopped")
        for worker in workers:
            worker.suspend()
        try:
            before = used_memory(redis)
            accepted = sum(accepted_postbacks(service.url + self.settings.ingest_path, body) for _ in range(requests))
            after = used_memory(redis)
        finally:
            for worker in workers:
                worker.resume()
        return waiting_memory_figures(before, after, accepted, requests)

    def run_loads(self, generators: list[LoadProcess], service: Service, monitor: Monitor) -> list[LoadResult]:
        """Watch the generators until every one has finished; their results in the same order."""
        results: dict[int, LoadResult] = {}
        try:
            while len(results) < len(generators):
                for index, generator in enumerate(generators):
                    if index not in results and generator.done():
                        results[index] = generator.result()
                monitor.tick()
                self.kill_at = self.kill_at or self.maybe_kill(service, monitor, self.started)
                self.show(monitor)
                time.sleep(TICK_SECONDS)
        finally:
            for generator in generators:
                generator.kill()
        return [results[index] for index in range(len(generators))]

    def wait_for_outcomes(self, monitor: Monitor, ids: list[str]) -> bool:
        """Poll until every accepted postback has a final outcome; True if max_wait ran out."""
        self.say("waiting")
        self.progress.update(self.task, total=len(ids))
        wait = self.settings.max_wait if self.settings.max_wait is not None else self.scenario.max_wait
        deadline = time.monotonic() + wait
        while not monitor.all_final(ids):
            if time.monotonic() > deadline:
                return True
            monitor.tick()
            self.show(monitor)
            time.sleep(TICK_SECONDS)
        return False

    def maybe_kill(self, service: Service, monitor: Monitor, started: float) -> float | None:
        """SIGKILL a worker that is busy with a job, once kill_at has come."""
        if self.scenario.kill_at is None or time.time() < started + self.scenario.kill_at or not service.owned:
            return None
        busy = busy_worker_pids(service)
        workers = {child.pid: child for child in service.workers() if child.alive()}
        victims = [pid for pid in busy if pid in workers]
        if not victims:
            return None  # try again at the next tick, until one is mid-job
        os.kill(victims[0], signal.SIGKILL)
        monitor.forget(workers[victims[0]].name)
        self.say(f"killed {workers[victims[0]].name}")
        return time.time()

    # --- progress ----------------------------------------------------------------------------

    def show(self, monitor: Monitor) -> None:
        accepted, delivered, final = monitor.accepted, len(monitor.delivered), len(monitor.final_seen_at)
        backlog = accepted - final
        self.progress.update(self.task, completed=final, accepted=accepted, delivered=delivered, backlog=backlog)

    def say(self, message: str) -> None:
        """A short word on what the scenario is doing (the progress line has little room)."""
        self.progress.update(self.task, description=f"{self.scenario.name} {message}")


def accepted_postbacks(url: str, body: bytes) -> int:
    """POST one request; the postbacks its 202 says were accepted (0 for any other answer)."""
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(json.load(response)["accepted"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return 0


def busy_worker_pids(service: Service) -> list[int]:
    """Pids of the RQ workers that say (in Redis) they are running a job."""
    redis = service.redis()
    pids = []
    for key in redis.smembers(WORKERS_KEY.format(queue=settings.POSTBACK_QUEUE)):
        state, pid = redis.hmget(key, ["state", "pid"])
        if state == b"busy" and pid:
            pids.append(int(pid))
    return pids
