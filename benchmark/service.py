"""The service under test: started here on loopback (Redis, database, gunicorn, RQ workers),
or one already running, reached by URL.

A started service is run the way production runs it (deploy/gunicorn.conf.py, `manage.py
rqworker postbacks --with-scheduler`, Redis with AOF every second and a password) with the
environment a local benchmark needs: loopback receivers allowed, HTTPS redirect off, and
settings read from the database at most a second stale.
"""

import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from django.conf import settings
from redis import Redis

# The project root (manage.py, deploy/): where every child process runs.
BASE_DIR = Path(__file__).resolve().parent.parent
STOP_GRACE_SECONDS = 10.0
ReadyCheck = Callable[[], bool]
WORKERS_KEY = "rq:workers:{queue}"  # RQ's set of the workers listening on a queue


def raise_open_files_limit() -> None:
    """As many open files as the machine allows, for this process and those it starts: the
    receivers of `wild` hold a listening socket per host and a connection per request in flight,
    and the workers thousands of connections (1,024, a common default, is far too few)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, ready: ReadyCheck, timeout: float, processes: "list[Child] | None" = None) -> None:
    """Poll `ready` until it holds; fail early if one of `processes` died meanwhile."""
    deadline = time.monotonic() + timeout
    while not ready():
        for child in processes or []:
            if child.popen.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with {child.popen.returncode} while waiting for {what}:\n{child.log_tail()}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Child:
    """A process we started, its role and its log file."""

    name: str
    popen: "subprocess.Popen[bytes]"
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, args: list[str], env: dict[str, str], logs: Path) -> Child:
    log_path = logs / f"{name}.log"
    log: IO[bytes] = log_path.open("wb")
    popen = subprocess.Popen(args, cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child holds its own copy
    return Child(name, popen, log_path)


def stop_all(children: list[Child], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to all, then SIGKILL to any still alive after the grace period."""
    for child in children:
        if child.alive():
            child.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.popen.kill()
            child.popen.wait()


@dataclass(frozen=True)
class ServiceExtras:
    """What a scenario's receivers need of the service: environment variables for every process
    (e.g. DELIVERY_CA_BUNDLE) and a prefix for the workers' command (a private mount namespace
    with the run's own resolv.conf)."""

    environment: dict[str, str] = field(default_factory=dict)
    worker_prefix: list[str] = field(default_factory=list)


@dataclass
class ServiceOptions:
    web_workers: int = 2
    workers: int = 2
    concurrency: int | None = None  # DELIVERY_CONCURRENCY; None keeps the service default
    database_url: str | None = None  # None: a temporary SQLite database
    settings_cache_seconds: float = 1.0
    keep_logs: Path | None = None  # copy each scenario's process logs here before cleaning up


@dataclass
class Service:
    """What a scenario needs to know about the service, whoever started it."""

    url: str
    redis_url: str
    database_url: str | None  # None: this process's own default database
    children: list[Child] = field(default_factory=list)
    settings_cache_seconds: float = 5.0

    @property
    def owned(self) -> bool:
        return bool(self.children)

    def redis(self) -> Redis:
        return Redis.from_url(self.redis_url, socket_timeout=10)

    def workers(self) -> list[Child]:
        return [child for child in self.children if child.name.startswith("worker")]

    def processes(self) -> dict[str, int]:
        """Role -> pid of every process we started that still runs."""
        return {child.name: child.pid for child in self.children if child.alive()}


class Healthz:
    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


class WorkersRegistered:
    def __init__(self, redis: Redis, queue: str, count: int) -> None:
        self.redis, self.key, self.count = redis, WORKERS_KEY.format(queue=queue), count

    def __call__(self) -> bool:
        return int(self.redis.scard(self.key)) >= self.count


class RedisAnswers:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def __call__(self) -> bool:
        try:
            return bool(self.redis.ping())
        except Exception:  # noqa: BLE001  # any failure means "not yet"
            return False


class LocalService:
    """Starts and stops a whole service under a temporary directory."""

    def __init__(self, options: ServiceOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.template_db: Path | None = None

    def prepare(self) -> None:
        """Once per run: migrate the database (a template SQLite file, copied per scenario)."""
        if self.options.database_url is None:
            self.template_db = self.workdir / "template.sqlite3"
            self.migrate(f"sqlite:///{self.template_db}")
        else:
            self.migrate(self.options.database_url)

    def migrate(self, database_url: str) -> None:
        env = self.base_env(database_url, "redis://127.0.0.1:1/0")
        done = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"],
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py migrate failed:\n{done.stdout}\n{done.stderr}")

    def base_env(self, database_url: str, redis_url: str) -> dict[str, str]:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "postbackproject.settings",
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "SECRET_KEY": secrets.token_urlsafe(48),
            "DEBUG": "false",
            "SECURE_SSL_REDIRECT": "false",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DELIVERY_ALLOW_NETWORKS": "127.0.0.0/8",
            "DELIVERY_SETTINGS_CACHE_SECONDS": str(self.options.settings_cache_seconds),
            # The access log is nginx's job in production; writing it here costs the web CPU.
            "GUNICORN_ACCESS_LOG": "",
            # Production's web behind nginx (postback-web.service), unless the caller says otherwise.
            "GUNICORN_WORKER_CLASS": os.environ.get("GUNICORN_WORKER_CLASS", "sync"),
        }
        if self.options.concurrency is not None:
            env["DELIVERY_CONCURRENCY"] = str(self.options.concurrency)
        return env

    starts_service = True

    def start(self, name: str, extras: ServiceExtras | None = None) -> Service:
        """A fresh Redis, a fresh copy of the database, gunicorn and the workers."""
        extras = extras or ServiceExtras()
        scratch = self.workdir / name
        logs = scratch / "logs"
        logs.mkdir(parents=True)
        children: list[Child] = []
        try:
            redis_url, redis_child = self.start_redis(scratch, logs)
            children.append(redis_child)
            database_url = self.scenario_database(scratch)
            env = {**self.base_env(database_url, redis_url), **extras.environment}
            web_port = free_port()
            web_env = {
                **env,
                "GUNICORN_BIND": f"127.0.0.1:{web_port}",
                "WEB_CONCURRENCY": str(self.options.web_workers),
            }
            gunicorn = [
                sys.executable,
                "-m",
                "gunicorn",
                "postbackproject.wsgi:application",
                "-c",
                "deploy/gunicorn.conf.py",
            ]
            children.append(spawn("web", gunicorn, web_env, logs))
            for number in range(1, self.options.workers + 1):
                rqworker = [sys.executable, "manage.py", "rqworker", settings.POSTBACK_QUEUE, "--with-scheduler"]
                worker = [*extras.worker_prefix, *rqworker]
                children.append(spawn(f"worker{number}", worker, env, logs))
            service = Service(
                url=f"http://127.0.0.1:{web_port}",
                redis_url=redis_url,
                database_url=database_url,
                children=children,
                settings_cache_seconds=self.options.settings_cache_seconds,
            )
            wait_for("gunicorn", Healthz(service.url), 60, children)
            workers = WorkersRegistered(service.redis(), settings.POSTBACK_QUEUE, self.options.workers)
            wait_for("the RQ workers", workers, 60, children)
            return service
        except BaseException:
            stop_all(children)
            raise

    def start_redis(self, scratch: Path, logs: Path) -> tuple[str, Child]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (deploy/run-local.sh installs it)")
        port, password = free_port(), secrets.token_hex(16)
        data = scratch / "redis"
        data.mkdir()
        args = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory", "1gb", "--maxmemory-policy", "noeviction", "--requirepass", password,
        ]  # fmt: skip
        child = spawn("redis", args, dict(os.environ), logs)
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        wait_for("redis-server", RedisAnswers(Redis.from_url(url)), 20, [child])
        return url, child

    def scenario_database(self, scratch: Path) -> str:
        if self.template_db is None:
            assert self.options.database_url is not None
            return self.options.database_url
        copy = scratch / "db.sqlite3"
        shutil.copyfile(self.template_db, copy)
        return f"sqlite:///{copy}"

    def stop(self, service: Service) -> None:
        # Web first (no new work), then the workers (each finishes its job), Redis last.
        stop_all([child for child in service.children if child.name == "web"])
        stop_all(service.workers())
        stop_all([child for child in service.children if child.name == "redis"])
        if self.options.keep_logs is not None and service.children:
            logs = service.children[0].log_path.parent
            shutil.copytree(logs, self.options.keep_logs / logs.parent.name, dirs_exist_ok=True)


def remote_service(url: str, redis_url: str | None, database_url: str | None, cache_seconds: float) -> Service:
    """A running service: its Redis and database default to this process's own settings."""
    return Service(
        url=url.rstrip("/"),
        redis_url=redis_url or settings.REDIS_URL,
        database_url=database_url,
        settings_cache_seconds=cache_seconds,
    )
