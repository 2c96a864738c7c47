"""The benchmark's receiver: an HTTP/1.1 server on loopback that answers as told and records
every request it gets.

It must never be the bottleneck: Python's http.server tops out near 200 requests/s here, so
this is a bare asyncio.Protocol that parses just what it needs (request line, Content-Length,
Expect, Connection and the X-Postback-* headers). It runs in processes of its own, so it does
not share a GIL with the load generator or the tool. A receiver is one or many listeners
(address, port, behaviour, optionally a TLS certificate): one listener is served by every
process at once (SO_REUSEPORT); many listeners (the `wild` scenario's hosts) are shared out
between the processes. Records come back to the parent through a pipe when it stops, and two
live counts (requests received, requests not yet answered) are kept in shared memory.

Behaviours, per listener: added latency (a timer, never a blocking sleep), an error rate
(that fraction answered `error_status`), stalls (the status line and headers at once, then
one body byte every `drip_interval` seconds, "dripping", until `stall_for` seconds after the
receiver started, when the rest of the body goes out and new requests are answered normally),
and silence (the connection is accepted and nothing is ever sent back: over TLS, not even the
handshake, as the listener then speaks plain TCP).
"""

import asyncio
import contextlib
import functools
import multiprocessing
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Protocol

# A receipt: [arrival (Unix time), X-Postback-Id, X-Postback-Attempt, status answered (0: none),
# completed, latency added (ms), answered (Unix time the answer was sent in full, 0.0 if never)].
# `completed` is False while (or if) an answer was never sent in full: the sender gave up.
Receipt = list[float | str | int | bool]
ARRIVAL, POSTBACK_ID, ATTEMPT, STATUS, COMPLETED, LATENCY_MS, ANSWERED = range(7)
# Live counts per process, in shared memory: requests received, requests not yet answered,
# connections accepted.
RECEIVED, IN_FLIGHT, CONNECTIONS = range(3)


class SharedCounts(Protocol):
    """Integers in shared memory (multiprocessing's Array without a lock: one writer each)."""

    def __getitem__(self, index: int) -> int: ...

    def __setitem__(self, index: int, value: int) -> None: ...


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
    silent: bool = False  # accept, read, never answer (the connection stays until the client leaves)
    close_after_answer: bool = False  # every answer closes its connection: each request a new one


@dataclass(frozen=True)
class Listener:
    """One address:port the receiver serves, how it behaves there, and over what."""

    address: str = "127.0.0.1"
    port: int = 0  # 0: the serving process binds a free port and reports it
    behaviour: Behaviour = field(default_factory=Behaviour)
    certificate: str | None = None  # PEM file holding the key and the chain: HTTPS

    @property
    def scheme(self) -> str:
        return "https" if self.certificate else "http"


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
    """One listener's behaviour and clock, and its process's records and live counts."""

    def __init__(
        self, behaviour: Behaviour, receipts: list[Receipt] | None = None, counts: SharedCounts | None = None
    ) -> None:
        self.behaviour = behaviour
        self.started = time.monotonic()
        self.receipts: list[Receipt] = [] if receipts is None else receipts
        self.counts = counts

    def stalling(self) -> bool:
        stall_for = self.behaviour.stall_for
        return self.behaviour.stall and (stall_for is None or time.monotonic() - self.started < stall_for)

    def record(self, head: Head, status: int, latency_ms: float = 0.0) -> Receipt:
        receipt: Receipt = [time.time(), head.postback_id, head.attempt, status, False, latency_ms, 0.0]
        self.receipts.append(receipt)
        if self.counts is not None:
            self.counts[RECEIVED] += 1  # one writer per process: no lock needed
            self.counts[IN_FLIGHT] += 1
        return receipt

    def answered(self, receipt: Receipt) -> None:
        receipt[COMPLETED] = True
        receipt[ANSWERED] = time.time()
        self.left(receipt)

    def left(self, receipt: Receipt) -> None:
        """The request is no longer waiting for its answer (answered, or its client left)."""
        if self.counts is not None:
            self.counts[IN_FLIGHT] -= 1


class ReceiverProtocol(asyncio.Protocol):
    """One connection. Requests are answered one at a time, in order (nobody pipelines)."""

    def __init__(self, state: ReceiverState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.continued = False
        self.pending: Receipt | None = None  # the request being answered
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.state.counts is not None:
            self.state.counts[CONNECTIONS] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.pending is not None:
            self.state.left(self.pending)
            self.pending = None

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
            if self.state.behaviour.close_after_answer:
                head = replace(head, keep_alive=False)
            self.respond(head)

    def respond(self, head: Head) -> None:
        behaviour = self.state.behaviour
        if behaviour.silent:
            self.pending = self.state.record(head, 0)  # and nothing more: busy until the client leaves
            return
        if self.state.stalling():
            self.pending = self.state.record(head, 200)
            self.drip(head, self.pending, behaviour.drip_body_bytes)
            return
        failing = behaviour.error_rate > 0 and random.random() < behaviour.error_rate
        status = behaviour.error_status if failing else 200
        receipt = self.pending = self.state.record(head, status, behaviour.latency_ms)
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
        self.state.answered(receipt)
        self.pending = None
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


def tls_context(certificate: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate)
    return context


async def serve(
    listeners: Sequence[Listener], shared: bool, control: Connection, counts: SharedCounts
) -> list[Receipt]:
    """Listen on every listener, say "ready" and the ports bound on the control pipe, serve
    until the parent writes to it; returns the receipts."""
    loop = asyncio.get_running_loop()
    receipts: list[Receipt] = []
    servers = []
    for listener in listeners:
        state = ReceiverState(listener.behaviour, receipts, counts)
        server = await loop.create_server(
            functools.partial(ReceiverProtocol, state),
            listener.address,
            listener.port,
            reuse_port=shared,
            backlog=1024,
            ssl=tls_context(listener.certificate) if listener.certificate else None,
        )
        servers.append(server)
    stop = asyncio.Event()
    loop.add_reader(control.fileno(), stop.set)
    control.send(("ready", [int(server.sockets[0].getsockname()[1]) for server in servers]))
    await stop.wait()
    loop.remove_reader(control.fileno())
    for server in servers:
        server.close()
    return receipts


def run_process(listeners: Sequence[Listener], shared: bool, control: Connection, counts: SharedCounts) -> None:
    """A receiver process: serve until the parent says stop, then send back the receipts."""
    receipts: list[Receipt] = []
    with contextlib.suppress(KeyboardInterrupt):
        receipts = asyncio.run(serve(listeners, shared, control, counts))
    control.recv()  # the "stop" that woke us
    control.send(receipts)


@dataclass
class _Child:
    process: BaseProcess
    control: Connection
    counts: SharedCounts
    listeners: list[int]  # indexes into Receiver.listeners


class Receiver:
    """One receiver: `processes` server processes serving `listeners`.

    One listener: every process serves it (its port must be given: they share it with
    SO_REUSEPORT). Several: each process serves a share of them, and a port of 0 is bound by
    the process and known after start().
    """

    def __init__(self, name: str, listeners: Sequence[Listener], processes: int = 1) -> None:
        if len(listeners) == 1 and processes > 1 and listeners[0].port == 0:
            raise ValueError("a listener shared by several processes needs its port chosen beforehand")
        self.name = name
        self.listeners = list(listeners)
        self._context = multiprocessing.get_context("spawn")
        self._children: list[_Child] = []
        self._processes = max(1, min(processes, len(listeners)) if len(listeners) > 1 else processes)

    @classmethod
    def single(cls, name: str, behaviour: Behaviour, port: int, processes: int = 1) -> "Receiver":
        """One loopback port, served by `processes` processes."""
        return cls(name, [Listener(port=port, behaviour=behaviour)], processes)

    @property
    def port(self) -> int:
        return self.listeners[0].port

    def url(self, path: str, index: int = 0) -> str:
        listener = self.listeners[index]
        return f"{listener.scheme}://{listener.address}:{listener.port}{path}"

    @property
    def pids(self) -> list[int]:
        return [child.process.pid for child in self._children if child.process.pid is not None]

    def start(self, timeout: float = 30.0) -> None:
        shared = len(self.listeners) == 1
        for number in range(self._processes):
            mine = [0] if shared else list(range(number, len(self.listeners), self._processes))
            parent, child = self._context.Pipe()
            counts: SharedCounts = self._context.Array("q", 3, lock=False)
            process: BaseProcess = self._context.Process(
                target=run_process,
                args=([self.listeners[index] for index in mine], shared, child, counts),
                daemon=True,
            )
            process.start()
            child.close()  # so that a process that dies shows as the end of the pipe
            self._children.append(_Child(process, parent, counts, mine))
        for entry in self._children:
            try:
                reply = entry.control.recv() if entry.control.poll(timeout) else None
            except EOFError:
                reply = None
            if not (isinstance(reply, tuple) and reply[0] == "ready"):
                self.stop()
                raise RuntimeError(f"receiver {self.name} did not start")
            for index, port in zip(entry.listeners, reply[1], strict=True):
                self.listeners[index] = replace(self.listeners[index], port=port)

    def received(self) -> int:
        """Requests received so far (live, from shared memory)."""
        return sum(child.counts[RECEIVED] for child in self._children)

    def in_flight(self) -> int:
        """Requests received and not yet answered (nor left by their client), live."""
        return sum(child.counts[IN_FLIGHT] for child in self._children)

    def connections(self) -> int:
        """Connections accepted so far (over TLS: once the handshake is done), live."""
        return sum(child.counts[CONNECTIONS] for child in self._children)

    def stop(self, timeout: float = 30.0) -> list[Receipt]:
        """Stop every process and return all their receipts, in arrival order."""
        receipts: list[Receipt] = []
        for child in self._children:
            if child.process.is_alive():
                with contextlib.suppress(OSError):
                    child.control.send("stop")
                if child.control.poll(timeout):
                    receipts.extend(child.control.recv())
            child.process.join(5)
            if child.process.is_alive():
                child.process.kill()
        self._children.clear()
        receipts.sort(key=lambda receipt: float(receipt[ARRIVAL]))
        return receipts
