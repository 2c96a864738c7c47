"""Ceilings measured in the same run, so that ratios hold on a noisy machine.

- ingest: GET /healthz on the same gunicorn with the scenario's load shape (the fastest a
  Django response can be on these processes);
- delivery: a plain `requests.Session` loop, PLAIN_CLIENT_THREADS threads (or fewer, with a
  lower DELIVERY_CONCURRENCY), one process, against the same receiver (what a simple client
  gets out of the same machine);
- ingest, against the brief's stack (`--php-baseline`): the same load on a minimal PHP page
  behind nginx and PHP-FPM, with the same Redis (benchmark/php.py);
- queue: no-op jobs through as many stock `rq.SimpleWorker` processes as the service has
  workers, on a scratch queue of the same Redis (RQ's fixed cost per job).
"""

import multiprocessing
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import psutil
import requests
from redis import Redis
from rq import Queue

from benchmark import php
from benchmark.loadgen import Generator, LoadPlan, LoadResult
from benchmark.metrics import cpu_seconds
from benchmark.receiver import Listener, Receiver
from benchmark.service import BASE_DIR, free_port

# Threads of the plain client: past a few dozen they only fight over the GIL (a thousand run
# slower than 64), and a baseline slowed that way would flatter the ratio.
PLAIN_CLIENT_THREADS = 64

NOOP_QUEUE = "benchmark-noop"
NOOP_JOB = "benchmark.noop.noop"


def healthz_requests_per_second(service_url: str, clients: int, duration: float) -> float:
    """Closed loop of GET /healthz; run in a process of its own like the load itself."""
    plan = LoadPlan(url=service_url + "/healthz", bodies=[b""], clients=clients, duration=duration, parse_ids=False)
    result = run_in_own_process(plan)
    ok = sum(1 for _, _, status, _ in result.records if status == 200)
    seconds = result.ended - result.started
    return ok / seconds if seconds > 0 else 0.0


def php_requests_per_second(scratch: Path, pool: str, children: int, redis_url: str, plan: LoadPlan) -> float:
    """202s a second from the PHP page (benchmark/php.py) under the same load as ingestion's,
    with the same Redis; run in a process of its own like the load itself."""
    with php.php_site(scratch, pool, children, redis_url) as url:
        result = run_in_own_process(replace(plan, url=url + "/ingest.php", parse_ids=False))
    accepted = sum(1 for _, _, status, _ in result.records if status == 202)
    seconds = result.ended - result.started
    return accepted / seconds if seconds > 0 else 0.0


def run_in_own_process(plan: LoadPlan) -> LoadResult:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        result: LoadResult = pool.apply(_run_generator, (plan,))
    return result


def plain_client_requests_per_second(url: str, threads: int, duration: float) -> float:
    """requests.Session per thread, `threads` threads, one process, for `duration` seconds."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return float(pool.apply(_plain_client_loop, (url, threads, duration)))


def _plain_client_loop(url: str, threads: int, duration: float) -> float:
    counts = [0] * threads
    deadline = time.monotonic() + duration

    def client(index: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                session.get(url, headers={"X-Postback-Id": "baseline", "X-Postback-Attempt": "1"}, timeout=10)
                counts[index] += 1

    started = time.monotonic()
    pool = [threading.Thread(target=client, args=(index,)) for index in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def rq_noop_jobs_per_second(redis_url: str, workers: int, jobs: int) -> float:
    """Enqueue `jobs` no-op jobs, run them with `workers` stock SimpleWorkers in burst mode.

    Timed from the first job taken to the queue's end, so worker start-up is not counted.
    """
    redis = Redis.from_url(redis_url)
    queue = Queue(NOOP_QUEUE, connection=redis)
    redis.delete(queue.key)
    prepared = [Queue.prepare_data(NOOP_JOB, result_ttl=0) for _ in range(jobs)]
    for start in range(0, jobs, 500):
        with redis.pipeline() as pipe:
            queue.enqueue_many(prepared[start : start + 500], pipeline=pipe)
            pipe.execute()
    rq = str(Path(sys.executable).parent / "rq")
    args = [rq, "worker", "--burst", "--worker-class", "rq.SimpleWorker", "--url", redis_url, "-q", NOOP_QUEUE]
    processes = [
        subprocess.Popen(args, cwd=BASE_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(workers)
    ]
    try:
        first_taken, remaining_then = _wait_first_taken(queue, jobs)
        for process in processes:
            process.wait(timeout=300)
        finished = time.monotonic()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return remaining_then / (finished - first_taken) if finished > first_taken else 0.0


def _wait_first_taken(queue: Queue, jobs: int) -> tuple[float, int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        remaining = int(queue.count)
        if remaining < jobs:
            return time.monotonic(), remaining + 1
        time.sleep(0.005)
    raise RuntimeError("no stock RQ worker took a job within 60 s")


def receiver_ceiling(
    listeners: Sequence[Listener] | None = None,
    processes: int = 1,
    clients: int = 64,
    seconds: float = 3.0,
    ca_bundle: str | None = None,
    new_connections: bool = False,
) -> dict[str, float]:
    """Requests/s a receiver answers to a pycurl closed loop of keep-alive clients (or with a
    new connection each), the receiver's and the generator's CPU a request. By default one
    listener on 127.0.0.1; given listeners (e.g. the `wild` hosts), each request goes to the
    next of them."""
    listeners = list(listeners or [Listener(port=free_port())])
    receiver = Receiver("ceiling", listeners, processes)
    receiver.start()
    serving = [psutil.Process(pid) for pid in receiver.pids]
    try:
        targets = tuple(receiver.url("/data?key=k&value=v&foo=", index) for index in range(len(listeners)))
        plan = LoadPlan(
            url=targets[0],
            targets=targets if len(targets) > 1 else (),
            bodies=[b""],
            clients=clients,
            duration=seconds,
            parse_ids=False,
            ca_bundle=ca_bundle,
            new_connections=new_connections,
        )
        context = multiprocessing.get_context("spawn")
        before = sum(cpu_seconds(process) for process in serving)
        with context.Pool(1) as pool:
            result: LoadResult = pool.apply(_run_generator, (plan,))
        receiver_cpu = sum(cpu_seconds(process) for process in serving) - before
    finally:
        receiver.stop()
    answered = sum(1 for _, _, status, _ in result.records if status == 200)
    return {
        "receiver_ceiling_requests_per_second": answered / (result.ended - result.started),
        "receiver_cpu_us_per_request": 1e6 * receiver_cpu / max(1, len(result.records)),
        "load_generator_cpu_us_per_request": 1e6 * result.cpu_seconds / max(1, len(result.records)),
        "receiver_processes": processes,
        "ceiling_clients": clients,
    }


def _run_generator(plan: LoadPlan) -> LoadResult:
    return Generator(plan).run()
