"""The load generator: libcurl's multi interface (pycurl) on one thread, in a process of its own.

libcurl keeps every request's state in C; Python only starts requests and reads the answers,
about 13 µs of CPU a request here, against about 1 ms for `requests`. So one process drives
thousands of requests a second from one core and leaves the other to the service.

Three shapes: open loop (`rate` requests a second, started on time whatever the answers), a
schedule (open loop too: one send at each offset given, e.g. waves of requests every 10 s) and
closed loop (`clients` requests in flight, each started when the one before it ends). A run
lasts `duration` seconds or `requests` requests (first sends; retries do not count), or as long
as its schedule. Each send takes the next body, cycling; with `targets`, it also goes to the
next URL of that list (the same index), e.g. to measure receivers spread over many hosts.

503 (backpressure): counted, and the same body is sent again after its Retry-After (capped at
RETRY_AFTER_CAP seconds), at most MAX_503_RETRIES times. A closed-loop client waits for its
retry. A body still refused after that, or whose retry would come after the end of a timed
run, is dropped and counted as dropped.
"""

import heapq
import io
import json
import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Protocol

import pycurl


class SharedCounters(Protocol):
    """Integers in shared memory (multiprocessing's Array without a lock: one writer)."""

    def __getitem__(self, index: int) -> int: ...

    def __setitem__(self, index: int, value: int) -> None: ...


RETRY_AFTER_CAP = 10.0
MAX_503_RETRIES = 5
REQUEST_TIMEOUT = 60
# Live counters, shared with the parent: requests answered, postbacks accepted, 503s.
ANSWERED, ACCEPTED, BACKPRESSURE = range(3)


@dataclass(frozen=True)
class LoadPlan:
    url: str
    bodies: list[bytes]  # cycled; an empty body (b"") is sent as GET
    rate: float | None = None  # open loop when set
    schedule: tuple[float, ...] | None = None  # open loop: seconds after the start of each send
    clients: int = 1  # closed loop: requests in flight
    duration: float | None = None
    requests: int | None = None
    max_in_flight: int = 1024  # open loop: beyond this the generator itself is saturated
    parse_ids: bool = True
    default_retry_after: float = 1.0  # after a 503 without Retry-After
    targets: tuple[str, ...] = ()  # URLs cycled with the bodies, instead of `url`
    ca_bundle: str | None = None  # for HTTPS targets behind a CA of the run's own
    new_connections: bool = False  # a new connection (and TLS handshake) for every request

    @property
    def open_loop(self) -> bool:
        return bool(self.rate) or self.schedule is not None

    def send_offset(self, index: int) -> float | None:
        """Seconds after the start at which open-loop send `index` is due; None: no more."""
        if self.schedule is not None:
            return self.schedule[index] if index < len(self.schedule) else None
        return index / self.rate if self.rate else None


@dataclass
class LoadResult:
    # One row per answered request: [sent, answered (Unix time), status, postback ids].
    records: list[tuple[float, float, int, list[str]]] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    backpressure: int = 0  # 503 answers
    retried: int = 0  # 503'd bodies sent again
    dropped: int = 0  # 503'd bodies whose retry was still waiting at the end
    errors: int = 0  # transport errors (no HTTP answer)
    late: int = 0  # open loop: sends that started late because max_in_flight was reached
    cpu_seconds: float = 0.0


@dataclass
class Slot:
    """One reusable easy handle and the request it carries."""

    handle: pycurl.Curl
    url: str = ""
    body: bytes = b""
    tries: int = 1
    sent: float = 0.0
    response: io.BytesIO = field(default_factory=io.BytesIO)
    retry_after: float | None = None

    def header_line(self, line: bytes) -> None:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"retry-after":
            try:
                self.retry_after = float(value.strip())
            except ValueError:
                self.retry_after = None


def new_slot(url: str, plan: LoadPlan) -> Slot:
    handle = pycurl.Curl()
    slot = Slot(handle)
    handle.setopt(pycurl.URL, url)
    if plan.ca_bundle:
        handle.setopt(pycurl.CAINFO, plan.ca_bundle)
    if plan.new_connections:
        handle.setopt(pycurl.FRESH_CONNECT, 1)
        handle.setopt(pycurl.FORBID_REUSE, 1)
    handle.setopt(pycurl.NOSIGNAL, 1)
    handle.setopt(pycurl.TIMEOUT, REQUEST_TIMEOUT)
    # No "Expect: 100-continue" for bodies over 1 KiB: it would cost a round trip or a wait.
    handle.setopt(pycurl.HTTPHEADER, ["Content-Type: application/json", "Expect:"])
    handle.setopt(pycurl.WRITEDATA, slot.response)
    handle.setopt(pycurl.HEADERFUNCTION, slot.header_line)
    return slot


def load_slot(slot: Slot, body: bytes, tries: int) -> None:
    slot.body = body
    slot.tries = tries
    slot.response.seek(0)
    slot.response.truncate()
    slot.retry_after = None
    if body:
        slot.handle.setopt(pycurl.POSTFIELDS, body)
    else:
        slot.handle.setopt(pycurl.HTTPGET, 1)


def accepted_ids(body: bytes) -> list[str]:
    """Postback ids from a 202 body `{"accepted": N, "postbacks": [ids]}`."""
    try:
        return [str(pid) for pid in json.loads(body)["postbacks"]]
    except (ValueError, KeyError, TypeError):
        return []


class Generator:
    def __init__(self, plan: LoadPlan, counters: SharedCounters | None = None) -> None:
        self.plan = plan
        self.counters = counters
        self.multi = pycurl.CurlMulti()
        # Keep a connection to every target alive between its turns (libcurl keeps few by default).
        self.multi.setopt(pycurl.M_MAXCONNECTS, max(64, len(plan.targets) + plan.clients))
        self.idle: list[Slot] = []
        self.busy: dict[int, Slot] = {}
        self.retries: list[tuple[float, int, tuple[bytes, str], int]] = []  # heap: due, seq, (body, URL), tries
        self.result = LoadResult()
        self.sent_first = 0
        self.body_index = 0
        self.seq = 0

    # --- what to send ---------------------------------------------------------------------

    def next_body(self) -> tuple[bytes, str]:
        """The next body, and the URL it goes to."""
        index = self.body_index
        self.body_index += 1
        targets = self.plan.targets
        url = targets[index % len(targets)] if targets else self.plan.url
        return self.plan.bodies[index % len(self.plan.bodies)], url

    def next_send(self) -> float | None:
        """Unix time of the next open-loop send; None when the plan has no more."""
        offset = self.plan.send_offset(self.sent_first)
        return None if offset is None else self.result.started + offset

    def in_time(self, now: float) -> bool:
        return self.plan.duration is None or now < self.result.started + self.plan.duration

    def sending_open(self, now: float) -> bool:
        """Whether new bodies (not retries) may still be sent."""
        plan = self.plan
        if plan.requests is not None and self.sent_first >= plan.requests:
            return False
        if plan.schedule is not None:
            return self.sent_first < len(plan.schedule)
        return self.in_time(now)

    def start(self, sending: tuple[bytes, str], now: float, tries: int = 1) -> None:
        body, url = sending
        slot = self.idle.pop() if self.idle else new_slot(url, self.plan)
        slot.url = url
        slot.handle.setopt(pycurl.URL, url)
        load_slot(slot, body, tries)
        slot.sent = now
        self.busy[id(slot.handle)] = slot
        self.multi.add_handle(slot.handle)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> LoadResult:
        cpu = time.process_time()
        self.result.started = time.time()
        while True:
            now = time.time()
            self.start_due_retries(now)
            self.start_new(now)
            self.perform()
            self.collect()
            now = time.time()
            if not self.sending_open(now) and not self.busy and not self.retries:
                break
            if not self.has_room(now):  # else a request just ended: its client sends again at once
                self.wait(now)
        self.result.ended = time.time()
        self.result.cpu_seconds = time.process_time() - cpu
        for slot in self.idle:
            slot.handle.close()
        self.multi.close()
        return self.result

    def start_new(self, now: float) -> None:
        """Open loop: every send whose time has come. Closed loop: one per idle client."""
        if self.plan.open_loop:
            while self.sending_open(now) and (due := self.next_send()) is not None and due <= now:
                if len(self.busy) >= self.plan.max_in_flight:
                    self.result.late += 1
                    return
                self.start(self.next_body(), now)
                self.sent_first += 1
        else:
            while self.has_room(now):
                self.start(self.next_body(), now)
                self.sent_first += 1

    def has_room(self, now: float) -> bool:
        """Closed loop: a client is free to send a new body."""
        clients_busy = len(self.busy) + len(self.retries)
        return not self.plan.open_loop and clients_busy < self.plan.clients and self.sending_open(now)

    def wait(self, now: float) -> None:
        """Until a socket is ready, the next open-loop send, or the next retry (50 ms at most)."""
        wait = 0.05
        if self.plan.open_loop and self.sending_open(now) and (due := self.next_send()) is not None:
            wait = min(wait, max(0.0, due - now))
        if self.retries:
            wait = min(wait, max(0.0, self.retries[0][0] - now))
        if self.busy:
            self.multi.select(wait)
        elif wait > 0:
            time.sleep(wait)

    def start_due_retries(self, now: float) -> None:
        in_time = self.in_time(now)
        while self.retries and (self.retries[0][0] <= now or not in_time):
            _, _, sending, tries = heapq.heappop(self.retries)
            if in_time:
                self.result.retried += 1
                self.start(sending, now, tries + 1)
            else:
                self.result.dropped += 1

    def perform(self) -> None:
        while True:
            status, _ = self.multi.perform()
            if status != pycurl.E_CALL_MULTI_PERFORM:
                return

    def collect(self) -> None:
        while True:
            queued, ok, failed = self.multi.info_read()
            now = time.time()
            for handle in ok:
                self.finish(handle, now, int(handle.getinfo(pycurl.RESPONSE_CODE)))
            for handle, _, _ in failed:
                self.finish(handle, now, 0)
            if queued == 0:
                return

    def finish(self, handle: pycurl.Curl, now: float, status: int) -> None:
        self.multi.remove_handle(handle)
        slot = self.busy.pop(id(handle))
        self.idle.append(slot)
        ids = accepted_ids(slot.response.getvalue()) if status == 202 and self.plan.parse_ids else []
        self.result.records.append((slot.sent, now, status, ids))
        if status == 0:
            self.result.errors += 1
        if status == 503:
            self.backpressure(slot, now)
        if self.counters is not None:
            self.counters[ANSWERED] += 1
            self.counters[ACCEPTED] += len(ids)
            self.counters[BACKPRESSURE] += status == 503

    def backpressure(self, slot: Slot, now: float) -> None:
        """A 503: send the body again after Retry-After, or drop it after MAX_503_RETRIES."""
        self.result.backpressure += 1
        if slot.tries > MAX_503_RETRIES:
            self.result.dropped += 1
            return
        delay = min(
            slot.retry_after if slot.retry_after is not None else self.plan.default_retry_after, RETRY_AFTER_CAP
        )
        self.seq += 1
        heapq.heappush(self.retries, (now + delay, self.seq, (slot.body, slot.url), slot.tries))


def run_in_process(plan: LoadPlan, counters: SharedCounters, results: Connection) -> None:
    results.send(Generator(plan, counters).run())


class LoadProcess:
    """A load generator in its own process; `counters` can be read live while it runs."""

    def __init__(self, plan: LoadPlan, counters: SharedCounters) -> None:
        context = multiprocessing.get_context("spawn")
        self._results, child = context.Pipe(duplex=False)
        self.process = context.Process(target=run_in_process, args=(plan, counters, child), daemon=True)
        self.process.start()
        child.close()

    def done(self) -> bool:
        return self._results.poll()

    def result(self) -> LoadResult:
        result: LoadResult = self._results.recv()
        self.process.join(10)
        return result

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()


def new_counters() -> SharedCounters:
    context = multiprocessing.get_context("spawn")
    counters: SharedCounters = context.Array("q", 3, lock=False)
    return counters
