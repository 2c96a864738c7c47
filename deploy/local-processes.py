#!/usr/bin/env python3
"""The local run's processes, in the foreground: Redis, then web and two workers once Redis
answers, each line of their output prefixed with the time and the process's name.
deploy/run-local.sh starts this last, from the repository root, with var/local.env in the
environment.

Stopping (Ctrl-C, SIGTERM, or the terminal closing) goes in order, each step waiting until the
one before has ended: web first (no new requests are taken), then the workers (each finishes
the requests it has in flight, up to DELIVERY_STOP_GRACE_SECONDS, records them and its own exit
in Redis), Redis last (it writes its append-only file and exits). A process that outlives its
step's time is killed, and the next step goes on. If any process exits on its own, the others
are stopped the same way and this exits 1.

Each process runs in a session of its own, so a terminal's Ctrl-C (SIGINT to every process of
the foreground group) reaches only this script, which then stops them in order. Like the
systemd units (KillMode=mixed), SIGTERM goes to each main process, which stops its own
children; SIGKILL, if needed, goes to its whole process group.

Usage: .venv/bin/python deploy/local-processes.py   (no arguments; settings from the environment)
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
# Web and workers wait for Redis this long at most (deploy/wait-for-redis.py's --timeout).
REDIS_START_SECONDS = 30
# After SIGTERM: gunicorn finishes the requests it is answering (ingest requests take
# milliseconds; a slow client is cut off here rather than after its 30 s graceful_timeout).
WEB_STOP_SECONDS = 10.0
# After SIGTERM a worker waits DELIVERY_STOP_GRACE_SECONDS for requests in flight, then records
# what came back and acknowledges it: this much more before it is killed.
WORKER_STOP_MARGIN_SECONDS = 6.0
# local-redis.sh waits up to 4 s for clients still connected, then Redis writes its AOF.
REDIS_STOP_SECONDS = 20.0
# How often the supervisor looks for a process that ended on its own.
WATCH_INTERVAL_SECONDS = 0.2
# Lines of output still in flight from an ended process are awaited this long at most (a
# grandchild holding the pipe must not hold up the stop).
DRAIN_SECONDS = 2.0


@dataclass(frozen=True)
class Program:
    name: str
    argv: list[str]
    stop_seconds: float


def programs() -> tuple[Program, list[Program]]:
    """Redis, and the processes that need it: the same commands as the systemd units."""
    python = sys.executable
    grace = float(os.environ.get("DELIVERY_STOP_GRACE_SECONDS") or 4)
    worker = [python, "manage.py", "rqworker", "postbacks", "--with-scheduler"]
    web = [python, "-m", "gunicorn", "postbackproject.wsgi:application", "-c", "deploy/gunicorn.conf.py"]
    return Program("redis", ["deploy/local-redis.sh"], REDIS_STOP_SECONDS), [
        Program("web", web, WEB_STOP_SECONDS),
        Program("worker1", worker, grace + WORKER_STOP_MARGIN_SECONDS),
        Program("worker2", worker, grace + WORKER_STOP_MARGIN_SECONDS),
    ]


class Output:
    """Lines from every process, one at a time, each with the time and who wrote it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.width = 8

    def line(self, name: str, text: str) -> None:
        with self.lock:
            sys.stdout.write(f"{datetime.now():%H:%M:%S} {name:<{self.width}}| {text}\n")
            sys.stdout.flush()

    def say(self, text: str) -> None:
        self.line("system", text)

    def copy(self, name: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.line(name, raw.decode("utf-8", "replace").rstrip("\r\n"))
        stream.close()


class Running:
    """One started process and the thread that copies its output."""

    def __init__(self, program: Program, output: Output) -> None:
        self.program = program
        self.process = subprocess.Popen(
            program.argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # out of reach of the terminal's Ctrl-C: stopped in order, below
        )
        assert self.process.stdout is not None
        self.reader = threading.Thread(target=output.copy, args=(program.name, self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def name(self) -> str:
        return self.program.name

    def ended(self) -> bool:
        return self.process.poll() is not None

    def terminate(self) -> None:
        if not self.ended():
            self.process.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> bool:
        """Whether it ended by the deadline (time.monotonic())."""
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def status(self) -> str:
        code = self.process.returncode
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


class Supervisor:
    def __init__(self) -> None:
        self.output = Output()
        self.running: list[Running] = []
        self.stop_requested = threading.Event()

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_requested.is_set():
            self.output.say("already stopping: web first, then the workers, Redis last")
            return
        self.output.say(f"{signal.Signals(signum).name}: stopping web, then the workers, Redis last")
        self.stop_requested.set()

    def start(self, program: Program) -> Running:
        running = Running(program, self.output)
        self.running.append(running)
        self.output.say(f"{program.name} started (pid {running.process.pid})")
        return running

    def wait_for_redis(self) -> bool:
        """Whether Redis answered PING (with REDIS_URL's password) before a stop was asked for."""
        argv = [sys.executable, "deploy/wait-for-redis.py", "--timeout", str(REDIS_START_SECONDS)]
        waiting = Running(Program("redis", argv, 0.0), self.output)
        while not waiting.ended():
            if self.stop_requested.wait(WATCH_INTERVAL_SECONDS) or self.ended_on_its_own():
                waiting.kill()
                return False
        return waiting.process.returncode == 0

    def ended_on_its_own(self) -> Running | None:
        return next((running for running in self.running if running.ended()), None)

    def watch(self) -> Running | None:
        """Until a stop is asked for (None) or a process ends on its own (that one)."""
        while not self.stop_requested.wait(WATCH_INTERVAL_SECONDS):
            ended = self.ended_on_its_own()
            if ended is not None:
                return ended
        return None

    def stop(self, names: list[str]) -> None:
        """SIGTERM to these processes at once; then wait for each, killing any past its time."""
        group = [running for running in self.running if running.name in names]
        for running in group:
            running.terminate()
        for running in group:
            if not running.wait(time.monotonic() + running.program.stop_seconds):
                self.output.say(f"{running.name} still running after {running.program.stop_seconds:g} s: killed")
                running.kill()
            running.reader.join(DRAIN_SECONDS)  # its last lines, before the next step's
            self.output.say(f"{running.name} stopped ({running.status()})")

    def stop_in_order(self) -> None:
        for step in (["web"], ["worker1", "worker2"], ["redis"]):
            self.stop(step)


def main() -> int:
    supervisor = Supervisor()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, supervisor.request_stop)
    redis, others = programs()
    supervisor.start(redis)
    if not supervisor.wait_for_redis():
        if not supervisor.stop_requested.is_set():
            supervisor.output.say("Redis did not answer: see its lines above")
        supervisor.stop_in_order()
        return 0 if supervisor.stop_requested.is_set() else 1
    for program in others:
        supervisor.start(program)
    ended = supervisor.watch()
    if ended is not None:
        supervisor.output.say(f"{ended.name} ended on its own ({ended.status()}): stopping the others")
    supervisor.stop_in_order()
    return 0 if ended is None else 1


if __name__ == "__main__":
    sys.exit(main())
