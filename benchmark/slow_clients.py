"""Slow clients against a running web process (`manage.py slowclients`): N clients send a
request one byte at a time (headers, or headers at once and then the body), while GET /healthz
is timed. Where gunicorn is reached directly (the local run), each such client holds a thread
for as long as it trickles."""

import http.client
import socket
import threading
import time
from dataclasses import dataclass

BODY = b'{"endpoint": {"method": "GET", "url": "http://127.0.0.1/x"}, "data": [{}]}' + b" " * 2000
# Longest a /healthz may take before it counts as not answered.
HEALTHZ_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Timings:
    clients: int
    answered: int
    not_answered: int  # no answer within HEALTHZ_TIMEOUT_SECONDS
    median_ms: float
    p95_ms: float
    max_ms: float


def trickle(host: str, port: int, byte_every: float, body_only: bool, stop: threading.Event) -> None:
    """One slow client, again and again until stopped: a POST /ingest.php a byte at a time."""
    head = f"POST /ingest.php HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), timeout=120) as client:
                if body_only:
                    client.sendall(head)
                data = BODY if body_only else head + BODY
                for index in range(len(data)):
                    if stop.wait(byte_every):
                        return
                    client.sendall(data[index : index + 1])
        except OSError:
            stop.wait(0.1)


def healthz_ms(host: str, port: int) -> float | None:
    """How long GET /healthz took (ms), or None when it did not answer in time."""
    started = time.monotonic()
    connection = http.client.HTTPConnection(host, port, timeout=HEALTHZ_TIMEOUT_SECONDS)
    try:
        connection.request("GET", "/healthz")
        connection.getresponse().read()
    except OSError:
        return None
    finally:
        connection.close()
    return (time.monotonic() - started) * 1000


def measure(host: str, port: int, clients: int, seconds: float, byte_every: float, body_only: bool) -> Timings:
    """Time /healthz ten times a second for `seconds` while `clients` slow clients trickle."""
    stop = threading.Event()
    for _ in range(clients):
        threading.Thread(target=trickle, args=(host, port, byte_every, body_only, stop), daemon=True).start()
    stop.wait(2.0)  # every slow client connected and holding its thread
    answered: list[float] = []
    missed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        took = healthz_ms(host, port)
        if took is None:
            missed += 1
        else:
            answered.append(took)
        stop.wait(0.1)
    stop.set()
    answered.sort()
    return Timings(clients, len(answered), missed, _at(answered, 0.5), _at(answered, 0.95), _at(answered, 1.0))


def _at(ordered: list[float], share: float) -> float:
    """The value at that share of an ordered list (NaN for none)."""
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")
