"""Real parts for the suite: a redis-server of its own, HTTP receivers on loopback, and the
real RQ worker code (DeliveryWorker, a SimpleWorker, in burst mode)."""

import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from redis import Redis

from delivery import circuit, drain, hosts, partitions, transport
from delivery.models import DeliveryAttempt, Outcome, PostbackRequest
from delivery.worker import DeliveryWorker
from postbackproject import inbox, shards
from postbackproject.postback import Try
from postbackproject.queue import forget_connections, get_connection, get_queue, get_queue_connection
from postbackproject.settings import BASE_DIR
from postbackproject.shards import Shard
from tests.lean_client import LeanPathClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll with a deadline (the suite's only way of waiting)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def http_answers(url: str, status: int = 200, method: str = "GET") -> bool:
    """Whether a web process answers url with status within a second; a process still starting
    (not listening yet, or listening but too busy importing to answer in time) does not."""
    try:
        return requests.request(method, url, data=b"", timeout=1).status_code == status
    except requests.RequestException:
        return False


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; what survives is what the AOF holds."""
        self.process.kill()
        self.process.wait(timeout=10)


def start_redis(aof: bool = False, port: int | None = None, workdir: str | None = None) -> RedisServer:
    """A redis-server of the suite's own; with aof, persisting as production does (everysec).
    Given the port and folder of one that stopped, it starts again from what that one wrote."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = port or free_port()
    workdir = workdir or tempfile.mkdtemp(prefix="postback-test-redis-")
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else ["--appendonly", "no"]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence, "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    client = Redis(port=port)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except Exception:  # noqa: BLE001
            return False

    wait_until(answers, what="redis-server to answer")
    return RedisServer(port=port, process=process, workdir=workdir)


def use_redis(url: str) -> None:
    settings.REDIS_URL = url
    settings.RQ_QUEUES = {settings.POSTBACK_QUEUE: {**settings.RQ_QUEUES[settings.POSTBACK_QUEUE], "URL": url}}
    forget_connections()
    circuit.process_circuits.cache_clear()


@pytest.fixture
def latest_migrations_after() -> Iterator[None]:
    """For a test that takes the database back to an older migration: whatever its outcome, the
    tests after it find the schema of the latest migrations."""
    yield
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    use_redis(server.url)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def clean_redis(redis_server: RedisServer) -> Iterator[Redis]:
    """Every test starts with an empty Redis and fresh per-process state."""
    use_redis(redis_server.url)
    get_connection().flushall()
    transport.process_transport.cache_clear()  # picks up DELIVERY_ALLOW_NETWORKS afresh
    hosts.process_limits().clear()  # no host earned anything yet
    circuit.process_circuits.cache_clear()  # a fresh view of the circuits, for the fresh Redis
    drain._stop.clear()
    partitions.forget_known()  # a test's partitions went with its transaction
    shards.turns = shards.Turns()  # its stamps of the shards in use went with Redis's contents
    yield get_connection()


# --- receivers -----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (to provoke read timeouts)
    # Answer only once this many requests wait together (500 if they never do).
    barrier: threading.Barrier | None = None
    # Send the headers, then the body one byte every this many seconds (until `release`).
    drip_every: float = 0.0
    # Send these bytes instead of an HTTP response (a receiver that does not speak HTTP), and close.
    raw: bytes | None = None


@dataclass
class Received:
    method: str
    target: str  # the request target exactly as sent: path and query
    headers: dict[str, str]
    body: bytes
    client_port: int  # tells connections apart: a kept-alive connection keeps its port
    received_at: float = 0.0  # Unix time the request was read (this machine's clock, Redis's too)
    tls_session_reused: bool | None = None  # HTTPS: whether the handshake resumed a session
    client_address: str = ""  # tells hosts apart: the address the request came from


class QuietHTTPServer(ThreadingHTTPServer):
    """A client that hangs up (a worker killed, a request timed out) or refuses the server's
    certificate is not an error here."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class Receiver:
    """An HTTP server on loopback that records every request and answers from a script
    (then with `default`). Dripping replies stop dripping once `release` is set."""

    def __init__(
        self, default: Reply | None = None, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.requests: list[Received] = []
        self.script: list[Reply] = []
        self.default = default or Reply()
        self.release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver._lock:
                    received = Received(
                        self.command,
                        self.path,
                        dict(self.headers),
                        body,
                        self.client_address[1],
                        time.time(),
                        getattr(self.connection, "session_reused", None),
                        self.client_address[0],
                    )
                    receiver.requests.append(received)
                    reply = receiver.script.pop(0) if receiver.script else receiver.default
                if reply.raw is not None:
                    self.wfile.write(reply.raw)
                    self.close_connection = True
                    return
                if reply.delay:
                    time.sleep(reply.delay)
                status = reply.status
                if reply.barrier is not None:
                    try:
                        reply.barrier.wait(timeout=5)
                    except threading.BrokenBarrierError:
                        status = 500
                self.send_response(status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if reply.drip_every:
                    self.drip(reply)
                else:
                    self.wfile.write(reply.body)

            def drip(self, reply: Reply) -> None:
                for index in range(len(reply.body)):
                    if receiver.release.wait(reply.drip_every):
                        self.wfile.write(reply.body[index:])
                        return
                    self.wfile.write(reply.body[index : index + 1])
                    self.wfile.flush()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = QuietHTTPServer((host, 0), Handler)
        if tls is not None:  # HTTPS: each connection's handshake runs in its own thread
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.server.daemon_threads = True
        self.scheme = "https" if tls is not None else "http"
        self.host = host
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def answer(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    @property
    def targets(self) -> list[str]:
        return [request.target for request in self.requests]

    def postback_ids(self) -> list[str]:
        with self._lock:
            return [request.headers["X-Postback-Id"] for request in self.requests]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def refused_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}/gone"


# --- workers -------------------------------------------------------------------------------


def run_worker() -> None:
    """One burst of the real worker: every job now in the queue, then stop. The worker takes
    garbage collection over for its process (delivery/collector.py): the suite's process gets
    Python's own collector back afterwards."""
    worker = DeliveryWorker([settings.POSTBACK_QUEUE], connection=get_queue_connection())
    worker.work(burst=True, logging_level="WARNING")
    gc.unfreeze()
    gc.enable()


def scheduled_retries() -> list[tuple[Try, float]]:
    """Tries waiting for their time (retries, deferrals, replays), with the Unix time each is
    due, in every inbox shard."""
    return [found for shard in shards.listed() for found in scheduled_in(shard)]


def scheduled_in(shard: Shard) -> list[tuple[Try, float]]:
    connection = get_connection()
    due: list[tuple[bytes, float]] = connection.zrange(shard.due, 0, -1, withscores=True)  # type: ignore[assignment]
    tries: dict[bytes, bytes] = connection.hgetall(shard.due_tries)  # type: ignore[assignment]
    return [(Try.from_fields(json.loads(tries[pid])), score / 1000) for pid, score in due]


def release_scheduled() -> int:
    """Make every waiting try due now, as time passing would."""
    connection = get_connection()
    released = 0
    for shard in shards.listed():
        waiting: list[bytes] = connection.zrange(shard.due, 0, -1)  # type: ignore[assignment]
        if waiting:
            connection.zadd(shard.due, dict.fromkeys(waiting, 0))
        released += len(waiting)
    return released


def deliver_everything(max_rounds: int = 20) -> None:
    """Run workers until no job is queued or scheduled, skipping the waits between retries."""
    for _ in range(max_rounds):
        run_worker()
        if not release_scheduled() and get_queue().count == 0 and not inbox.waiting_counts()["entries"]:
            return
    raise AssertionError("jobs kept coming back")


@pytest.fixture
def client() -> LeanPathClient:
    """pytest-django's test client, sending the ingest URLs down the lean path as production does."""
    return LeanPathClient()


def ingest_json(client, document: object, path: str = "/ingest.php"):
    return client.generic("POST", path, json.dumps(document).encode())


# --- service processes ---------------------------------------------------------------------


def database_url_for_processes() -> str:
    """The test database as a DATABASE_URL, for processes the suite starts."""
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{params['NAME']}"
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    return f"postgres://{params['USER']}{password}@{params['HOST']}:{params['PORT']}/{params['NAME']}"


def service_env(**overrides: str | None) -> dict[str, str]:
    """The suite's environment for a process, with overrides; an override of None drops the
    variable."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url_for_processes(),
        "REDIS_URL": settings.REDIS_URL,
        "PYTHONUNBUFFERED": "1",
    }
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class Processes:
    """Real worker processes (`manage.py rqworker`), and other scripts, stopped after the test."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def worker(self, on: list[str] | None = None, **env: str | None) -> subprocess.Popen[bytes]:
        """The production command: `manage.py rqworker postbacks --with-scheduler`."""
        return self.run([str(BASE_DIR / "manage.py"), "rqworker", "postbacks", "--with-scheduler"], on, **env)

    def web(self, bind: str | None = None, on: list[str] | None = None, **env: str | None) -> str:
        """gunicorn as production runs it, on a free loopback port unless bound elsewhere: its
        base URL (it may not answer yet)."""
        bind = bind or f"127.0.0.1:{free_port()}"
        argv = ["-m", "gunicorn", "postbackproject.wsgi:application", "-c", "deploy/gunicorn.conf.py"]
        self.run(argv, on, GUNICORN_BIND=bind, **env)
        return f"http://{bind}"

    def run(self, argv: list[str], on: list[str] | None = None, **env: str | None) -> subprocess.Popen[bytes]:
        """A Python script or module; `on` prefixes the command (`ip netns exec HOST`: run on
        another host)."""
        log = (self.logs / f"process-{len(self.started)}.log").open("wb")
        process = subprocess.Popen(
            [*(on or []), sys.executable, *argv],
            cwd=BASE_DIR,
            env=service_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with everything it started
        )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def output(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-3000:] for path in sorted(self.logs.glob("process-*.log")))


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


def success_ids() -> set[str]:
    """Postbacks recorded as delivered."""
    return set(DeliveryAttempt.objects.filter(outcome=Outcome.SUCCESS).values_list("postback_id", flat=True))


def sent_url(postback_id: str) -> str:
    """The URL the postback was sent to, as its request row records it."""
    return PostbackRequest.of([postback_id])[postback_id].url
