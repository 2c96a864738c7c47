"""CPU per request of the web application in-process: the WSGI entry point called directly, no
socket, no server (docs/performance.md, "What bounds each figure").

Each figure is `time.process_time` over `calls` calls, best of `rounds`, with Redis on
loopback (its own CPU is not counted). What is left out is the server's share (gunicorn's
accept, parse and close), the same for every path, which the benchmark's requests/s include.
"""

import io
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from django.conf import settings
from redis import Redis

from benchmark.payloads import sample
from benchmark.service import RedisAnswers, free_port, wait_for
from postbackproject import shards

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def environ(method: str, path: str, body: bytes = b"") -> dict[str, Any]:
    """A request as gunicorn hands it to the application (HTTP/1.1 on loopback)."""
    return {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_USER_AGENT": "benchmark",
        "CONTENT_TYPE": "application/json" if body else "",
        "CONTENT_LENGTH": str(len(body)) if body else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def call(app: WSGIApp, request: dict[str, Any]) -> str:
    """Call the application as a server would (status, headers, body iterated and closed)."""
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        status.append(line)
        return lambda data: None

    result = app(request, start_response)
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return status[0]


Case = tuple[WSGIApp, str, str, bytes, str]  # application, method, path, body, status expected


def cpu_us_per_call(case: Case, calls: int) -> float:
    """CPU µs per call over `calls` calls, Redis's inbox emptied first."""
    app, method, path, body, expected = case
    Redis.from_url(settings.REDIS_URL).delete(*(shard.inbox for shard in shards.configured()))
    requests = [environ(method, path, body) for _ in range(calls)]
    started = time.process_time()
    for request in requests:
        if (answered := call(app, request)) != expected:
            raise RuntimeError(f"{path} answered {answered}, not {expected} (SECURE_SSL_REDIRECT=false?)")
    return (time.process_time() - started) / calls * 1e6


def best_of(cases: dict[str, Case], calls: int, rounds: int) -> dict[str, float]:
    """Each case's best round; the rounds interleave the cases, so that a busy moment of the
    machine weighs on all of them alike."""
    for case in cases.values():
        cpu_us_per_call(case, 100)  # warm: imports, the key table, the settings row
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, case in cases.items():
            best[name] = min(best[name], cpu_us_per_call(case, calls))
    return best


@contextmanager
def scratch_redis() -> Iterator[str]:
    """A Redis of its own on a free loopback port, as the benchmark starts it (without AOF)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (deploy/run-local.sh installs it)")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", folder, "--save", ""]
        child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            wait_for("redis-server", RedisAnswers(Redis.from_url(url)), 20)
            yield url
        finally:
            child.terminate()
            child.wait()


def sample_body() -> bytes:
    return sample("http://127.0.0.1:9")


def measure(lean: WSGIApp, django: WSGIApp, calls: int, rounds: int) -> dict[str, float]:
    """CPU µs per request: /healthz, and an ingest of the sample on the lean path (/ingest.php
    and /i) and, for comparison, through Django's whole stack."""
    body = sample_body()
    return best_of(
        {
            "/healthz": (lean, "GET", "/healthz", b"", "200 OK"),
            "/ingest.php": (lean, "POST", "/ingest.php", body, "202 Accepted"),
            "/i": (lean, "POST", "/i", body, "202 Accepted"),
            "/i, Django's stack": (django, "POST", "/i", body, "202 Accepted"),
        },
        calls,
        rounds,
    )
