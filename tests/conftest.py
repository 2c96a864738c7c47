"""Real parts for the suite: a redis-server of its own, HTTP receivers on loopback, and the
real RQ worker code (DeliveryWorker, a SimpleWorker, in burst mode)."""

import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.conf import settings
from redis import Redis

from delivery import drain
from delivery.worker import DeliveryWorker
from postbackproject import inbox
from postbackproject.postback import Try
from postbackproject.queue import get_connection, get_queue


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


def start_redis() -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="postback-test-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
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
    get_connection.cache_clear()
    get_queue.cache_clear()
    inbox._script.cache_clear()


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
    drain.process_transport.cache_clear()  # picks up DELIVERY_ALLOW_NETWORKS afresh
    drain._stop.clear()
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


@dataclass
class Received:
    method: str
    target: str  # the request target exactly as sent: path and query
    headers: dict[str, str]
    body: bytes
    client_port: int  # tells connections apart: a kept-alive connection keeps its port


class Receiver:
    """An HTTP server on loopback that records every request and answers from a script."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[Reply] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver._lock:
                    received = Received(self.command, self.path, dict(self.headers), body, self.client_address[1])
                    receiver.requests.append(received)
                    reply = receiver.script.pop(0) if receiver.script else Reply()
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
                self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    @property
    def targets(self) -> list[str]:
        return [request.target for request in self.requests]

    def close(self) -> None:
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
    """One burst of the real worker: every job now in the queue, then stop."""
    DeliveryWorker([settings.POSTBACK_QUEUE], connection=get_connection()).work(burst=True, logging_level="WARNING")


def scheduled_retries() -> list[tuple[Try, float]]:
    """Tries waiting for their time (retries, deferrals, replays), with the Unix time each is due."""
    connection = get_connection()
    due: list[tuple[bytes, float]] = connection.zrange(inbox.DUE, 0, -1, withscores=True)  # type: ignore[assignment]
    tries: dict[bytes, bytes] = connection.hgetall(inbox.DUE_TRIES)  # type: ignore[assignment]
    return [(Try.from_fields(json.loads(tries[pid])), score / 1000) for pid, score in due]


def release_scheduled() -> int:
    """Make every waiting try due now, as time passing would."""
    connection = get_connection()
    waiting: list[bytes] = connection.zrange(inbox.DUE, 0, -1)  # type: ignore[assignment]
    if waiting:
        connection.zadd(inbox.DUE, dict.fromkeys(waiting, 0))
    return len(waiting)


def deliver_everything(max_rounds: int = 20) -> None:
    """Run workers until no job is queued or scheduled, skipping the waits between retries."""
    for _ in range(max_rounds):
        run_worker()
        if not release_scheduled() and get_queue().count == 0 and not inbox.waiting_counts()["entries"]:
            return
    raise AssertionError("jobs kept coming back")


def ingest_json(client, document: object, path: str = "/ingest.php"):
    return client.generic("POST", path, json.dumps(document).encode())
