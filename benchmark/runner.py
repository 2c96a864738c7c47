"""Runs one scenario: service, settings, receivers, baselines, load, the wait for every
postback's final outcome, and the figures."""

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from django.conf import settings
from rich.progress import Progress

from benchmark import baselines, payloads
from benchmark.database import (
    AttemptLog,
    apply_settings,
    close_database,
    current_settings,
    open_database,
    restore_settings,
)
from benchmark.figures import RawRun, phase_figures, summarize
from benchmark.loadgen import LoadPlan, LoadProcess, LoadResult, new_counters
from benchmark.monitor import Monitor, redis_stats
from benchmark.receiver import Receiver
from benchmark.scenarios import Phase, Scenario
from benchmark.service import WORKERS_KEY, Service, free_port

TICK_SECONDS = 0.1
RQ_NOOP_JOBS = 2000


class ServiceProvider(Protocol):
    """Gives each scenario a service: a fresh one of the tool's own, or the running one."""

    def start(self, name: str) -> Service: ...

    def stop(self, service: Service) -> None: ...


@dataclass
class RunSettings:
    max_wait: float
    workers: int
    concurrency: int
    receiver_processes: int = 1
    ingest_path: str = "/ingest.php"
    baseline_seconds: float = 10.0  # longest a timed baseline runs (/healthz, plain client)


def plan_for(phase: Phase, service: Service, receiver: Receiver, ingest_path: str) -> LoadPlan:
    base = receiver.url("")
    body = (
        payloads.sample(base)
        if phase.objects is None
        else payloads.body(base + payloads.SAMPLE_PATH, payloads.objects(phase.objects))
    )
    return LoadPlan(
        url=service.url + ingest_path,
        bodies=[body],
        rate=phase.rate,
        clients=phase.clients,
        duration=phase.duration,
        requests=phase.requests,
    )


@contextlib.contextmanager
def receivers_for(scenario: Scenario, processes: int) -> Iterator[dict[str, Receiver]]:
    started: dict[str, Receiver] = {}
    try:
        for name, behaviour in scenario.receivers.items():
            receiver = Receiver(name, behaviour, free_port(), processes)
            receiver.start()
            started[name] = receiver
        yield started
    finally:
        for receiver in started.values():
            receiver.stop()


class ScenarioRun:
    def __init__(self, scenario: Scenario, provider: ServiceProvider, options: RunSettings, progress: Progress) -> None:
        self.scenario = scenario
        self.provider = provider
        self.settings = options
        self.progress = progress
        self.task = progress.add_task(scenario.name, total=None, accepted=0, delivered=0, backlog=0)

    def run(self) -> dict[str, Any]:
        service = self.provider.start(self.scenario.name)
        alias = open_database(service.database_url)
        previous = current_settings(alias)
        try:
            applied = apply_settings(alias, self.scenario.settings)
            time.sleep(service.settings_cache_seconds + 0.2)  # every process now reads the new row
            with receivers_for(self.scenario, self.settings.receiver_processes) as receivers:
                measured = self.baselines(service, receivers)
                raw = self.drive(service, alias, receivers)
            if self.scenario.name == "stall":
                raw.extra = {"stalled_receiver": phase_figures(raw, 0), "healthy_receiver": phase_figures(raw, 1)}
            figures = summarize(raw)
        finally:
            restore_settings(alias, previous)
            close_database(alias)
            self.provider.stop(service)
        figures.update(
            title=self.scenario.title,
            load=[phase.describe() for phase in self.scenario.phases],
            receivers={name: asdict(behaviour) for name, behaviour in self.scenario.receivers.items()},
            settings=applied,
            baselines=measured,
            workers=self.settings.workers,
            concurrency=self.settings.concurrency,
        )
        return figures

    # --- baselines ---------------------------------------------------------------------------

    def baselines(self, service: Service, receivers: dict[str, Receiver]) -> dict[str, float]:
        measured: dict[str, float] = {}
        phase = self.scenario.phases[0]
        wanted = self.scenario.baselines
        if "healthz" in wanted:
            self.say("baseline: GET /healthz")
            seconds = min(phase.duration or self.settings.baseline_seconds, self.settings.baseline_seconds)
            measured["healthz_requests_per_second"] = baselines.healthz_requests_per_second(
                service.url, phase.clients, seconds
            )
        if "plain" in wanted:
            self.say("baseline: plain requests.Session loop")
            url = receivers[phase.receiver].url("/data?key=k&value=v&foo=")
            measured["plain_client_requests_per_second"] = baselines.plain_client_requests_per_second(
                url, self.settings.concurrency, self.settings.baseline_seconds / 2
            )
        if "rq" in wanted:
            self.say("baseline: RQ no-op jobs")
            measured["rq_noop_jobs_per_second"] = baselines.rq_noop_jobs_per_second(
                service.redis_url, self.settings.workers, RQ_NOOP_JOBS
            )
        return measured

    # --- the load and the wait -----------------------------------------------------------------

    def drive(self, service: Service, alias: str, receivers: dict[str, Receiver]) -> RawRun:
        redis = service.redis()
        counters = new_counters()
        monitor = Monitor(redis, AttemptLog(alias), counters, {**service.processes(), **self.receiver_pids(receivers)})
        before = redis_stats(redis)
        loads: list[LoadResult] = []
        kill_at: float | None = None
        started = time.time()
        for phase in self.scenario.phases:
            self.say(f"load: {phase.mode} loop → receiver {phase.receiver}")
            generator = LoadProcess(
                plan_for(phase, service, receivers[phase.receiver], self.settings.ingest_path), counters
            )
            while not generator.done():
                monitor.tick()
                kill_at = kill_at or self.maybe_kill(service, monitor, started)
                self.show(monitor)
                time.sleep(TICK_SECONDS)
            loads.append(generator.result())
        started = min(load.started for load in loads)
        load_ended = max(load.ended for load in loads)
        ids = [pid for load in loads for _, _, _, batch in load.records for pid in batch]
        timed_out = self.wait_for_outcomes(monitor, ids)
        monitor.poll_attempts()
        after = redis_stats(redis)
        ended = time.time()
        receipts = {name: receiver.stop() for name, receiver in receivers.items()}
        return RawRun(
            name=self.scenario.name,
            started=started,
            load_ended=load_ended,
            ended=ended,
            wait_timed_out=timed_out,
            loads=loads,
            receipts=receipts,
            attempts=monitor.rows,
            final_seen_at=monitor.final_seen_at,
            redis_before=before,
            redis_after=after,
            rss=dict(monitor.rss),
            samples=monitor.samples,
            kill_at=kill_at,
            exited=monitor.exited,
        )

    def wait_for_outcomes(self, monitor: Monitor, ids: list[str]) -> bool:
        """Poll until every accepted postback has a final outcome; True if max_wait ran out."""
        self.say("waiting for every postback's final outcome")
        self.progress.update(self.task, total=len(ids))
        deadline = time.monotonic() + self.settings.max_wait
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
        self.say(f"SIGKILL sent to {workers[victims[0]].name} (pid {victims[0]})")
        return time.time()

    @staticmethod
    def receiver_pids(receivers: dict[str, Receiver]) -> dict[str, int]:
        return {
            f"receiver-{name}/{index}": pid
            for name, receiver in receivers.items()
            for index, pid in enumerate(receiver.pids)
        }

    # --- progress ----------------------------------------------------------------------------

    def show(self, monitor: Monitor) -> None:
        accepted, delivered, final = monitor.accepted, len(monitor.delivered), len(monitor.final_seen_at)
        backlog = accepted - final
        self.progress.update(self.task, completed=final, accepted=accepted, delivered=delivered, backlog=backlog)

    def say(self, message: str) -> None:
        self.progress.update(self.task, description=f"{self.scenario.name}: {message}")


def busy_worker_pids(service: Service) -> list[int]:
    """Pids of the RQ workers that say (in Redis) they are running a job."""
    redis = service.redis()
    pids = []
    for key in redis.smembers(WORKERS_KEY.format(queue=settings.POSTBACK_QUEUE)):
        state, pid = redis.hmget(key, ["state", "pid"])
        if state == b"busy" and pid:
            pids.append(int(pid))
    return pids
