"""The benchmark's DNS server: names of its own receivers, answered after a delay, on UDP.

Delivery resolves names with getaddrinfo (libcurl's threaded resolver), which asks the servers
of /etc/resolv.conf on port 53. The `wild` scenario gives its workers a resolv.conf naming this
server, so that a share of its hosts are reached by name as in the world, with a resolver that
takes its time (`delay_ms` per answer, a timer: never a blocking sleep).

dnslib reads and writes the wire format; the server is a bare asyncio DatagramProtocol in a
process of its own. Answers: A records from the table; NOERROR without records for any other
type of a known name (getaddrinfo asks AAAA beside A and must not wait for a timeout);
NXDOMAIN for unknown names.
"""

import asyncio
import contextlib
import multiprocessing
import typing
from collections.abc import Mapping
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord  # type: ignore[import-untyped]  # no stubs

from benchmark.receiver import SharedCounts

TTL_SECONDS = 60
# Live counts in shared memory: queries answered, and of them the A queries for known names.
ANSWERED, FOUND = range(2)


def answer(query: bytes, names: Mapping[str, str]) -> tuple[bytes, bool] | None:
    """The reply to one query and whether it found an address; None for what is not a query."""
    try:
        request = DNSRecord.parse(query)
    except DNSError:
        return None
    if request.header.qr or not request.questions:
        return None
    reply = request.reply()
    question = request.q
    address = names.get(str(question.qname).rstrip(".").lower())
    if address is None:
        reply.header.rcode = RCODE.NXDOMAIN
    elif question.qtype in (QTYPE.A, QTYPE.ANY):
        reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=TTL_SECONDS))
    return reply.pack(), address is not None and question.qtype in (QTYPE.A, QTYPE.ANY)


class DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, names: Mapping[str, str], delay_ms: float, counts: SharedCounts | None = None) -> None:
        self.names = names
        self.delay = delay_ms / 1000
        self.counts = counts
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        replied = answer(data, self.names)
        if replied is None:
            return
        reply, found = replied
        if self.counts is not None:
            self.counts[ANSWERED] += 1
            self.counts[FOUND] += found
        if self.delay > 0:
            asyncio.get_running_loop().call_later(self.delay, self.send, reply, addr)
        else:
            self.send(reply, addr)

    def send(self, reply: bytes, addr: tuple[str | object, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


async def serve(
    address: str, port: int, names: Mapping[str, str], delay_ms: float, control: Connection, counts: SharedCounts
) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: DnsProtocol(names, delay_ms, counts), local_addr=(address, port)
    )
    stop = asyncio.Event()
    loop.add_reader(control.fileno(), stop.set)
    control.send("ready")
    await stop.wait()
    loop.remove_reader(control.fileno())
    transport.close()


def run_process(
    address: str, port: int, names: Mapping[str, str], delay_ms: float, control: Connection, counts: SharedCounts
) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(address, port, names, delay_ms, control, counts))
    control.recv()
    control.send("stopped")


class DnsServer:
    """The DNS server in a process of its own, on address:port (UDP)."""

    def __init__(self, address: str, names: Mapping[str, str], delay_ms: float, port: int = 53) -> None:
        self.address = address
        self.port = port
        self.names = dict(names)
        self.delay_ms = delay_ms
        self._context = multiprocessing.get_context("spawn")
        self._counts: SharedCounts = self._context.Array("q", 2, lock=False)
        self._control: Connection | None = None
        self._process: BaseProcess | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, timeout: float = 20.0) -> None:
        """Serve; raises OSError's message as RuntimeError when the address cannot be bound."""
        parent, child = self._context.Pipe()
        self._control = parent
        self._process = self._context.Process(
            target=run_process,
            args=(self.address, self.port, self.names, self.delay_ms, child, self._counts),
            daemon=True,
        )
        self._process.start()
        child.close()  # so that a process that dies shows as the end of the pipe
        if not parent.poll(timeout):
            self.stop()
            raise RuntimeError(f"the DNS server did not start on {self.address}:{self.port}")
        try:
            parent.recv()
        except EOFError as exc:  # the process died: most likely the bind was refused
            self.stop()
            raise RuntimeError(f"the DNS server could not listen on {self.address}:{self.port}") from exc

    def queries(self) -> tuple[int, int]:
        """Queries answered so far, and of them the A queries that found an address."""
        return int(self._counts[ANSWERED]), int(self._counts[FOUND])

    def stop(self) -> None:
        if self._process is None or self._control is None:
            return
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._control.send("stop")
            self._control.poll(10)
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
        self._process = None
