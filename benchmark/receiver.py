"""The benchmark's receiver: an HTTP/1.1 server on loopback that answers as told and records
every request it gets.

It must never be the bottleneck: Python's http.server tops out near 200 requests/s here, so
this is a bare asyncio.Protocol that parses just what it needs (request line, Content-Length,
Expect, Connection and the X-Postback-* headers). It runs in processes of its own, so it does
not share a GIL with the load generator or the tool, and several processes can share one port
with SO_REUSEPORT. Its records come back to the parent through a pipe when it stops.

Behaviours, per receiver: added latency (a timer, never a blocking sleep), an error rate
(that fraction answered `error_status`), and stalls: the status line and headers at once, then
one body byte every `drip_interval` seconds ("dripping"), until `stall_for` seconds after the
receiver started, when the rest of the body goes out and new requests are answered normally.
"""

import asyncio
import contextlib
import multiprocessing
import random
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Protocol

# A receipt: [arrival (Unix time), X-Postback-Id, X-Postback-Attempt, status answered, completed].
# `completed` is False while (or if) a dripped body was never sent in full: the sender gave up.
Receipt = list[float | str | int | bool]
ARRIVAL, POSTBACK_ID, ATTEMPT, STATUS, COMPLETED = range(5)


class SharedCount(Protocol):
    """A number in shared memory (multiprocessing's Value without a lock: one writer)."""

    value: int


REASONS = {200: "OK", 500: "Internal Server Error", 503: "Service Unavailable"}
MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Behaviour:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    stall: bool = False
    stall_for: float | None = None  # seconds after start; None: the stall never ends
    drip_interval: float = 2.0
    drip_body_bytes: int = 1000


@dataclass(frozen=True)
class Head:
    """What the receiver needs of one request's head."""

    length: int  # bytes of head, including the blank line
    content_length: int
    postback_id: str
    attempt: int
    expects_continue: bool
    keep_alive: bool


def parse_head(buffer: bytes | bytearray) -> Head | None:
    """The request head at the start of buffer, or None until it has arrived in full."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise ValueError("request head too large")
        return None
    lines = bytes(buffer[:end]).split(b"\r\n")
    version = lines[0].rsplit(b" ", 1)[-1]
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    connection = fields.get(b"connection", b"").lower()
    keep_alive = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
    return Head(
        length=end + 4,
        content_length=int(fields.get(b"content-length", b"0") or 0),
        postback_id=fields.get(b"x-postback-id", b"").decode("latin-1"),
        attempt=int(fields.get(b"x-postback-attempt", b"0") or 0),
        expects_continue=fields.get(b"expect", b"").lower() == b"100-continue",
        keep_alive=keep_alive,
    )


def response_head(status: int, content_length: int, keep_alive: bool) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    return (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {content_length}\r\nConnection: {connection}\r\n\r\n"
    ).encode()


class ReceiverState:
    """Shared by every connection of one process: the behaviour, the clock and the records."""

    def __init__(self, behaviour: Behaviour, counter: SharedCount | None = None) -> None:
        self.behaviour = behaviour
        self.started = time.monotonic()
        self.receipts: list[Receipt] = []
        self.counter = counter

    def stalling(self) -> bool:
        stall_for = self.behaviour.stall_for
        return self.behaviour.stall and (stall_for is None or time.monotonic() - self.started < stall_for)

    def record(self, head: Head, status: int) -> Receipt:
        receipt: Receipt = [time.time(), head.postback_id, head.attempt, status, False]
        self.receipts.append(receipt)
        if self.counter is not None:
            self.counter.value += 1  # one writer per counter: no lock needed
        return receipt


class ReceiverProtocol(asyncio.Protocol):
    """One connection. Requests are answered one at a time, in order (nobody pipelines)."""

    def __init__(self, state: ReceiverState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.continued = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.next_request()

    def next_request(self) -> None:
        while not self.busy and not self.closed:
            try:
                head = parse_head(self.buffer)
            except ValueError:
                self.close()
                return
            if head is None:
                return
            if len(self.buffer) < head.length + head.content_length:
                if head.expects_continue and not self.continued:
                    self.continued = True
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            del self.buffer[: head.length + head.content_length]
            self.continued = False
            self.busy = True
            self.respond(head)

    def respond(self, head: Head) -> None:
        behaviour = self.state.behaviour
        if self.state.stalling():
            self.drip(head, self.state.record(head, 200), behaviour.drip_body_bytes)
            return
        failing = behaviour.error_rate > 0 and random.random() < behaviour.error_rate
        status = behaviour.error_status if failing else 200
        receipt = self.state.record(head, status)
        if behaviour.latency_ms > 0:
            loop = asyncio.get_running_loop()
            loop.call_later(behaviour.latency_ms / 1000, self.answer, head, receipt)
        else:
            self.answer(head, receipt)

    def answer(self, head: Head, receipt: Receipt) -> None:
        body = b"ok" if receipt[STATUS] == 200 else b"error"
        self.write(response_head(int(receipt[STATUS]), len(body), head.keep_alive) + body)
        self.finish(head, receipt)

    def drip(self, head: Head, receipt: Receipt, remaining: int) -> None:
        """Headers now, then a byte every drip_interval until the stall ends (then the rest)."""
        if self.closed:
            return
        if remaining == self.state.behaviour.drip_body_bytes:
            self.write(response_head(200, remaining, head.keep_alive))
        if not self.state.stalling():
            self.write(b"x" * remaining)
            self.finish(head, receipt)
            return
        self.write(b"x")
        if remaining == 1:
            self.finish(head, receipt)
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self.state.behaviour.drip_interval, self.drip, head, receipt, remaining - 1)

    def finish(self, head: Head, receipt: Receipt) -> None:
        if self.closed:
            return
        receipt[COMPLETED] = True
        self.busy = False
        if not head.keep_alive:
            self.close()
            return
        self.next_request()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


async def serve(state: ReceiverState, port: int, control: Connection) -> None:
    """Listen on port, say "ready" on the control pipe, serve until the parent writes to it."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ReceiverProtocol(state), "127.0.0.1", port, reuse_port=True, backlog=1024)
    stop = asyncio.Event()
    loop.add_reader(control.fileno(), stop.set)
    control.send("ready")
    async with server:
        await stop.wait()
    loop.remove_reader(control.fileno())


def run_process(behaviour: Behaviour, port: int, control: Connection, counter: SharedCount) -> None:
    """A receiver process: serve until the parent says stop, then send back the receipts."""
    state = ReceiverState(behaviour, counter)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(state, port, control))
    control.recv()  # the "stop" that woke us
    control.send(state.receipts)


class Receiver:
    """One receiver: `processes` server processes sharing one loopback port."""

    def __init__(self, name: str, behaviour: Behaviour, port: int, processes: int = 1) -> None:
        self.name = name
        self.behaviour = behaviour
        self.port = port
        self._context = multiprocessing.get_context("spawn")
        self._children: list[tuple[BaseProcess, Connection, SharedCount]] = []
        self._processes = processes

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _, _ in self._children if process.pid is not None]

    def start(self, timeout: float = 20.0) -> None:
        for _ in range(self._processes):
            parent, child = self._context.Pipe()
            counter: SharedCount = self._context.Value("q", 0, lock=False)
            process: BaseProcess = self._context.Process(
                target=run_process, args=(self.behaviour, self.port, child, counter), daemon=True
            )
            process.start()
            self._children.append((process, parent, counter))
        for process, parent, _ in self._children:
            if not parent.poll(timeout) or parent.recv() != "ready":
                process.kill()
                raise RuntimeError(f"receiver {self.name} did not start on port {self.port}")

    def received(self) -> int:
        """Requests received so far (live, from shared memory)."""
        return sum(counter.value for _, _, counter in self._children)

    def stop(self, timeout: float = 30.0) -> list[Receipt]:
        """Stop every process and return all their receipts, in arrival order."""
        receipts: list[Receipt] = []
        for process, parent, _ in self._children:
            if process.is_alive():
                parent.send("stop")
                if parent.poll(timeout):
                    receipts.extend(parent.recv())
            process.join(5)
            if process.is_alive():
                process.kill()
        self._children.clear()
        receipts.sort(key=lambda receipt: float(receipt[ARRIVAL]))
        return receipts
