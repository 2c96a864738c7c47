"""What the transport itself costs, apart from the rest of the service (`manage.py
transportcosts`): memory per request in flight, and CPU per request on a new connection and on
a reused one, over HTTP and HTTPS, against the benchmark's receiver on loopback.

Each figure is taken in a process of its own (spawned), so that one measurement's allocations
and connections do not flatter the next; the receiver runs in another process still.
"""

import contextlib
import ipaddress
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from benchmark.receiver import Behaviour, Listener, Receiver
from delivery.transport import Limits, Request, Transport

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
# Long enough for every request to be held at the receiver while memory is read.
HOLD_MS = 60_000.0
LIMITS = Limits(connect_timeout=10, read_timeout=120, total_timeout=180, body_max_bytes=4096)
DEADLINE_SECONDS = 120.0


@dataclass(frozen=True)
class Certificates:
    """A CA of the measurement's own, and a certificate for 127.0.0.1 signed by it."""

    ca_bundle: str
    server: str  # key and chain, as the receiver takes them

    @classmethod
    def made_in(cls, folder: Path) -> "Certificates":
        ca = trustme.CA()
        bundle, server = folder / "ca.pem", folder / "server.pem"
        ca.cert_pem.write_to_path(str(bundle))
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server))
        return cls(str(bundle), str(server))


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def raise_open_files_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def receiver_for(scheme: str, behaviour: Behaviour, certificates: Certificates) -> Receiver:
    certificate = certificates.server if scheme == "https" else None
    receiver = Receiver("costs", [Listener("127.0.0.1", 0, behaviour, certificate)])
    receiver.start()
    return receiver


def drive_until(transport: Transport, done: Callable[[], bool], what: str) -> None:
    """Poll the transport until `done()`, DEADLINE_SECONDS at most."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        transport.poll(0.05)


def memory_in_flight(url: str, in_flight: int, ca_bundle: str) -> float:
    """MiB of this process's RSS per 1,000 requests in flight at once to `url` (which holds
    them: connections open, requests sent, no answer yet)."""
    raise_open_files_limit()
    transport = Transport(LOOPBACK, ca_bundle, concurrency=in_flight, idle=0)
    try:
        before = rss_mib()
        for index in range(in_flight):
            transport.start(Request(str(index), 1, "GET", url, None), LIMITS, token=index)
        drive_until(transport, lambda: all_sent(transport), f"{in_flight} requests sent")
        held = rss_mib()
    finally:
        transport.abandon()
        transport.close()
    return (held - before) * 1000 / in_flight


def all_sent(transport: Transport) -> bool:
    """Every request in flight has gone out (libcurl's PRETRANSFER time is set)."""
    return all(slot.request_sent() for slot in transport.in_flight_slots())


def cpu_per_request(url: str, requests: int, ca_bundle: str) -> float:
    """µs of this process's CPU per request to `url`, 16 in flight."""
    raise_open_files_limit()
    transport = Transport(LOOPBACK, ca_bundle, concurrency=16)
    try:
        for index in range(16):  # settle in: first connections, TLS sessions, lazy imports
            transport.start(Request(f"w{index}", 1, "GET", url, None), LIMITS, token=index)
        drive_until(transport, lambda: transport.in_flight == 0, "the warm-up")
        sent = answered = 0
        started = time.process_time()
        while answered < requests:
            while transport.in_flight < 16 and sent < requests:
                transport.start(Request(str(sent), 1, "GET", url, None), LIMITS, token=sent)
                sent += 1
            answered += len(transport.poll(0.05))
        cpu = time.process_time() - started
    finally:
        transport.close()
    return cpu * 1e6 / requests


def in_a_process_of_its_own(function: Callable[..., float], *args: object) -> float:
    """Run function(*args) in a fresh spawned process and return its result."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return float(pool.apply(function, args))


@dataclass(frozen=True)
class Costs:
    memory_mib_per_1000: dict[str, float]  # scheme -> MiB per 1,000 requests in flight
    cpu_us_per_request: dict[str, float]  # "http new", "http reused", ... -> µs


def measure(in_flight: int = 1000, requests: int = 3000) -> Costs:
    raise_open_files_limit()
    memory: dict[str, float] = {}
    cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="transport-costs-") as folder:
        certificates = Certificates.made_in(Path(folder))
        for scheme in ("http", "https"):
            with receiving(scheme, Behaviour(latency_ms=HOLD_MS), certificates) as receiver:
                memory[scheme] = in_a_process_of_its_own(
                    memory_in_flight, receiver.url("/held"), in_flight, certificates.ca_bundle
                )
            for new in (True, False):
                # The receiver answers at once; with `new`, it closes each connection after it.
                with receiving(scheme, Behaviour(close_after_answer=new), certificates) as receiver:
                    cpu[f"{scheme} {'new' if new else 'reused'}"] = in_a_process_of_its_own(
                        cpu_per_request, receiver.url("/costs"), requests, certificates.ca_bundle
                    )
    return Costs(memory, cpu)


@contextlib.contextmanager
def receiving(scheme: str, behaviour: Behaviour, certificates: Certificates) -> Iterator[Receiver]:
    receiver = receiver_for(scheme, behaviour, certificates)
    try:
        yield receiver
    finally:
        receiver.stop()
