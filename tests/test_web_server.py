"""The web process as the local run starts it (gunicorn with deploy/gunicorn.conf.py, no nginx
in front): bodies sent chunked are read, and clients trickling their requests hold up no one."""

import http.client
import json
import runpy
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import requests
from django.conf import settings

from tests.conftest import Processes, Receiver, deliver_everything, free_port, http_answers, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

# The web server under test: gunicorn processes, and threads in each. Slow clients can hold
# all of them but one (a sync worker's processes were stopped by as many as there were).
WEB_PROCESSES = 2
WEB_THREADS = 4


@dataclass
class Web:
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)


@pytest.fixture
def web(processes: Processes) -> Web:
    port = free_port()
    processes.run(
        ["-m", "gunicorn", "postbackproject.wsgi:application", "-c", "deploy/gunicorn.conf.py"],
        GUNICORN_BIND=f"127.0.0.1:{port}",
        WEB_CONCURRENCY=str(WEB_PROCESSES),
        GUNICORN_THREADS=str(WEB_THREADS),
    )
    server = Web(port)
    wait_until(lambda: http_answers(f"{server.url}/healthz"), timeout=30, what="gunicorn to answer /healthz")
    return server


def sample(receiver: Receiver) -> bytes:
    """The exercise's sample request, its endpoint on the receiver."""
    return json.dumps(
        {
            "endpoint": {"method": "GET", "url": receiver.url("/data?key={key}&value={value}&foo={bar}")},
            "data": [{"key": "Azureus", "value": "Dendrobates"}, {"key": "Phyllobates", "value": "Terribilis"}],
        }
    ).encode()


def post_chunked(web: Web, body: bytes, chunk: int = 1000) -> tuple[int, dict[str, object]]:
    """POST /ingest.php with Transfer-Encoding: chunked (no Content-Length), in chunks of `chunk` bytes."""
    connection = web.connection()
    try:
        pieces = (body[start : start + chunk] for start in range(0, len(body), chunk))
        connection.request("POST", "/ingest.php", body=pieces, encode_chunked=True)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def padded_to(body: bytes, size: int) -> bytes:
    """The same JSON document, `size` bytes long (whitespace after it)."""
    return body + b" " * (size - len(body))


def test_a_chunked_request_is_delivered_exactly_as_the_same_request_with_content_length(web, receiver):
    body = sample(receiver)

    with_length = requests.post(f"{web.url}/ingest.php", data=body, timeout=30)
    status, answer = post_chunked(web, body, chunk=7)

    assert with_length.status_code == 202
    assert status == 202
    assert answer["accepted"] == with_length.json()["accepted"] == 2
    deliver_everything()
    sent = ["/data?key=Azureus&value=Dendrobates&foo=", "/data?key=Phyllobates&value=Terribilis&foo="]
    assert Counter(receiver.targets) == {target: 2 for target in sent}


def test_a_chunked_body_over_the_limit_is_refused_with_413_and_one_at_the_limit_is_accepted(web, receiver):
    limit = settings.INGEST_MAX_BODY_BYTES

    status, answer = post_chunked(web, padded_to(sample(receiver), limit + 1), chunk=64 * 1024)

    assert status == 413
    assert answer["error"] == f"body is larger than {limit} bytes"
    status, answer = post_chunked(web, padded_to(sample(receiver), limit), chunk=64 * 1024)
    assert status == 202
    assert answer["accepted"] == 2


@pytest.fixture
def slow_clients(web: Web) -> Iterator[list[socket.socket]]:
    """A client for every thread of the web server but one, each having sent its headers and the
    first byte of a 1,000-byte body, and then nothing more."""
    with ExitStack() as stack:
        clients = []
        for _ in range(WEB_PROCESSES * WEB_THREADS - 1):
            client = stack.enter_context(socket.create_connection(("127.0.0.1", web.port), timeout=5))
            client.sendall(b"POST /ingest.php HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{")
            clients.append(client)
        yield clients


def still_waiting(client: socket.socket) -> bool:
    """Connected, and no answer yet: the server is still waiting for the rest of the body."""
    client.setblocking(False)
    try:
        client.recv(1)
    except BlockingIOError:
        return True
    finally:
        client.setblocking(True)
    return False


def test_clients_trickling_their_bodies_do_not_stop_the_web_process_answering_others(web, receiver, slow_clients):
    answered: list[int] = []
    done = threading.Event()

    def ingest() -> None:
        answered.append(requests.post(f"{web.url}/ingest.php", data=sample(receiver), timeout=60).status_code)
        done.set()

    threading.Thread(target=ingest, daemon=True).start()

    # Under sync workers this waited for gunicorn's 30 s timeout to kill the held processes.
    wait_until(done.is_set, timeout=15, what="an answer while slow clients hold their connections")
    assert answered == [202]
    assert all(still_waiting(client) for client in slow_clients)


def gunicorn_config(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, object]:
    """deploy/gunicorn.conf.py's settings, read as gunicorn reads them, under this environment."""
    monkeypatch.delenv("GUNICORN_WORKER_CLASS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(settings.BASE_DIR / "deploy" / "gunicorn.conf.py"))


def test_the_local_run_gets_threads_and_production_behind_nginx_the_sync_worker(monkeypatch):
    local = gunicorn_config(monkeypatch, GUNICORN_THREADS="8")
    assert (local["worker_class"], local["threads"], local["worker_connections"]) == ("gthread", 8, 8)

    unit = (settings.BASE_DIR / "deploy" / "systemd" / "postback-web.service").read_text()
    assert "Environment=GUNICORN_WORKER_CLASS=sync" in unit.splitlines()
    production = gunicorn_config(monkeypatch, GUNICORN_WORKER_CLASS="sync", GUNICORN_THREADS="8")
    # One thread: gunicorn would turn a sync worker with threads into gthread.
    assert (production["worker_class"], production["threads"]) == ("sync", 1)


def test_gunicorn_believes_forwarded_headers_only_from_the_trusted_proxies(monkeypatch):
    monkeypatch.delenv("TRUSTED_PROXIES", raising=False)
    assert gunicorn_config(monkeypatch)["forwarded_allow_ips"] == ""  # reached directly: nobody

    production = gunicorn_config(monkeypatch, TRUSTED_PROXIES="127.0.0.1/32, 10.0.0.5/8")
    assert production["forwarded_allow_ips"] == "127.0.0.1/32,10.0.0.0/8"


@pytest.fixture
def local_run_web(processes: Processes) -> Web:
    """gunicorn with deploy/gunicorn.conf.py's defaults, as the local run starts it: 2 x cores + 1
    processes of 8 threads."""
    port = free_port()
    processes.run(
        ["-m", "gunicorn", "postbackproject.wsgi:application", "-c", "deploy/gunicorn.conf.py"],
        GUNICORN_BIND=f"127.0.0.1:{port}",
    )
    server = Web(port)
    wait_until(lambda: http_answers(f"{server.url}/healthz"), timeout=30, what="gunicorn to answer /healthz")
    return server


def test_eight_clients_sending_byte_by_byte_do_not_stop_healthz_answering(local_run_web):
    """Eight clients that send their requests a byte at a time each hold a thread of the local
    run's web process; /healthz is still answered (it takes processes x threads of them)."""
    request = b"POST /ingest.php HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{"
    with ExitStack() as stack:
        clients = [
            stack.enter_context(socket.create_connection(("127.0.0.1", local_run_web.port), timeout=5))
            for _ in range(8)
        ]
        for index in range(len(request)):
            for client in clients:
                client.sendall(request[index : index + 1])

        assert http_answers(f"{local_run_web.url}/healthz")
        assert all(still_waiting(client) for client in clients)
