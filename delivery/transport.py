"""HTTP to receivers: thousands of requests in flight on one thread, through libcurl.

A `requests.Session` call costs about 620 µs of CPU here and needs a thread per request in
flight; libcurl's multi interface keeps every request's state in C and costs a few tens of µs
a request, from one thread (docs/decisions.md, "libcurl"). One `Transport` per worker process
keeps its keep-alive connections, DNS answers and TLS sessions across jobs.

The loop is event-driven (libcurl's socket interface, decisions "An event loop for thousands
in flight"): libcurl says which sockets it waits on and when its next timer falls, the process
waits on epoll, and each turn hands libcurl only the sockets that are ready. A turn therefore
costs as much as the requests that moved, however many are in flight, and there is no
descriptor ceiling (select() stops at 1,024). Read timeouts sit in a heap (`timers.Deadlines`);
total and connect timeouts are libcurl's own timers. Names resolve on libcurl's resolver
threads, never on the loop. Requests are spread over several multi handles (`_Shard`), a
host's own first, so that libcurl's search for an idle connection to a host stays short.

The service sends requests to URLs that strangers give it. Checking the URL's text is no
defence (`http://2130706433/` is 127.0.0.1 to the resolver), and a check before resolving can
be raced by DNS. So the check runs where libcurl opens each socket, on the resolved address it
is about to connect to: it must be public, or inside DELIVERY_ALLOW_NETWORKS
(`delivery.address_policy`, which also judges IPv6 forms by the IPv4 address they carry).
Nothing is sent, not even a TCP SYN, to any other address.
"""

import codecs
import ipaddress
import math
import os
import select
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.utils import parsedate_to_datetime
from functools import cache, lru_cache

import certifi
import pycurl
from django.conf import settings

from delivery.address_policy import is_allowed_address, refusal
from delivery.hosts import host_of
from delivery.timers import Deadlines
from postbackproject.addresses import IPNetwork, parse_networks

USER_AGENT = "postback-delivery/1.0"
# Response bytes past the logged part that are still read, to keep the connection reusable;
# a longer reply closes its connection instead of being read to the end.
DRAIN_MAX_BYTES = 64 * 1024
# Requests per libcurl multi handle (`_Shard`): each has its own connection cache, which
# libcurl searches one connection at a time.
CONNECTIONS_PER_SHARD = 128
# How long a resolved name is used before it is looked up again.
DNS_CACHE_SECONDS = 60

# epoll's events on a socket (the low five bits) as libcurl's socket_action flags; hang-ups
# and errors count as readable, so that libcurl reads the end of the connection.
_CURL_FLAGS = [
    (pycurl.CSELECT_IN if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) else 0)
    | (pycurl.CSELECT_OUT if events & select.EPOLLOUT else 0)
    | (pycurl.CSELECT_ERR if events & select.EPOLLERR else 0)
    for events in range(32)
]
# libcurl's "what to wait for" (its socket callback) as epoll events.
_EPOLL_EVENTS = {
    pycurl.POLL_IN: select.EPOLLIN,
    pycurl.POLL_OUT: select.EPOLLOUT,
    pycurl.POLL_INOUT: select.EPOLLIN | select.EPOLLOUT,
}


@dataclass(frozen=True)
class Request:
    postback_id: str
    attempt: int
    method: str
    url: str  # exactly as it goes on the wire (ASCII)
    body: bytes | None
    headers: tuple[str, ...] = ()  # "Name: value" lines added to the product's own (signatures)
    host: str = ""  # the URL's host[:port] (hosts.host_of), when the caller knows it already
    # The sender's headers (`endpoint.headers`, rendered): below the product's own, see header_lines.
    sender_headers: tuple[tuple[str, str], ...] = ()
    # Its destination's extra headers (admin): over the sender's, below the product's own.
    destination_headers: tuple[tuple[str, str], ...] = ()
    traceparent: str = ""  # the W3C traceparent header to send (the attempt's span), if any


def header_lines(request: Request, with_body: bool) -> list[str | bytes]:
    """Every header line a request carries, merged here and nowhere else. Layers in order, the
    first to name a header (in any case) winning:

    1. the product's own: X-Postback-Id and -Attempt, the signatures, the traceparent when
       sent, "Expect:" (no 100-continue wait before a body);
    2. its destination's extra headers (`Destination.headers`, set in admin);
    3. the sender's (`endpoint.headers`), checked at ingestion and again when read from Redis;
    4. the product's defaults a sender may replace: Content-Type for a body, and libcurl's
       User-Agent and Accept, which a line of the same name replaces.

    An empty value goes as "Name;", libcurl's way of sending a header with no value
    ("Name:" would remove it); a value beyond ASCII goes as UTF-8.
    """
    own = [f"X-Postback-Id: {request.postback_id}", f"X-Postback-Attempt: {request.attempt}", "Expect:"]
    own.extend(request.headers)
    if request.traceparent:
        own.append(f"traceparent: {request.traceparent}")
    defaults = ["Content-Type: application/json"] if with_body else []
    if not request.sender_headers and not request.destination_headers:
        return [*own, *defaults]
    lines: list[str | bytes] = list(own)
    taken = {line.partition(":")[0].strip().lower() for line in own}
    for name, value in (*request.destination_headers, *request.sender_headers):
        lowered = name.lower()
        if lowered in taken:
            continue
        taken.add(lowered)
        line = f"{name}: {value}" if value else f"{name};"
        lines.append(line if line.isascii() else line.encode())
    lines.extend(line for line in defaults if line.partition(":")[0].lower() not in taken)
    return lines


@dataclass(frozen=True)
class Limits:
    """How long one request may take, and how much of its reply is kept."""

    connect_timeout: float  # to resolve the name and establish the connection (TLS included)
    read_timeout: float  # between bytes of the reply, and from the request to its first byte
    total_timeout: float  # connect to last byte, whatever the receiver does
    body_max_bytes: int
    # The connect and total timeouts in whole ms, as libcurl takes them (computed once).
    curl_timeouts_ms: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        timeouts = (max(1, round(self.connect_timeout * 1000)), max(1, round(self.total_timeout * 1000)))
        object.__setattr__(self, "curl_timeouts_ms", timeouts)


@dataclass(frozen=True)
class Response:
    """What came back from one request; `status` is None when no response arrived."""

    delivered_at: datetime
    status: int | None
    elapsed_ms: float
    body: str = ""
    error: str = ""
    retry_after_seconds: float | None = None
    # Whether a failure without a response may go away on its own (timeouts, refusals).
    transient: bool = False


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), if valid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


@lru_cache(maxsize=256)
def declared_charset(content_type: str | None) -> str:
    """The charset the receiver declared, else UTF-8 (receivers repeat themselves: cached)."""
    message = Message()
    message["Content-Type"] = content_type or ""
    charset = message.get_content_charset()
    try:
        return codecs.lookup(charset).name if charset else "utf-8"
    except LookupError:
        return "utf-8"


def connection_cache_size(concurrency: int, idle: int) -> int:
    """Connections libcurl may keep open: every request in flight, and `idle` more
    (DELIVERY_IDLE_CONNECTIONS). libcurl's cache counts both and closes the oldest idle one
    when it is full: sized below the concurrency, a connection that finishes while the cache
    is full is closed at once, and a busy host pays a new connection (and TLS handshake) for
    every request."""
    return concurrency + idle


class _Slot:
    """One libcurl easy handle and the request it carries now.

    Handles are reused, request after request, with the options that never change set once
    and the callbacks bound once to the slot; only what differs per request is set again.
    (`reset()` and setting everything anew cost more than the rest of a request's Python.)
    A slot's `generation` counts its requests, so that a read deadline left behind by an
    earlier request is told apart from the current one's.
    """

    __slots__ = (
        "allowed",
        "blocked",
        "body",
        "custom_method",
        "delivered_at",
        "generation",
        "handle",
        "header_lines",
        "host",
        "kept",
        "last_body_at",
        "limits",
        "live",
        "looked_at",
        "moved_at",
        "received",
        "request",
        "seen",
        "shard",
        "started",
        "step",
        "timeouts",
        "token",
        "too_long",
    )

    def __init__(
        self, allowed: tuple[IPNetwork, ...], ca_bundle: str, share: pycurl.CurlShare, shard: "_Shard"
    ) -> None:
        self.allowed = allowed
        self.shard = shard  # the multi handle it is added to, for good
        self.generation = 0
        self.live = False  # True while a request is in flight on it
        self.custom_method: str | None = None  # the CUSTOMREQUEST the handle is set to
        self.timeouts = (0, 0)  # the connect and total timeouts (ms) the handle is set to
        self.header_lines: list[bytes] = []  # cleared per request, never replaced: bound below
        self.body: list[bytes] = []
        self.handle = pycurl.Curl()
        self._set_fixed_options(ca_bundle, share)

    def _set_fixed_options(self, ca_bundle: str, share: pycurl.CurlShare) -> None:
        handle = self.handle
        handle.setopt(pycurl.SHARE, share)
        handle.setopt(pycurl.PATH_AS_IS, 1)  # send the path as given: no dot-segment squashing
        handle.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        handle.setopt(pycurl.PROXY, "")  # no proxy from the environment
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        handle.setopt(pycurl.USERAGENT, USER_AGENT)
        handle.setopt(pycurl.CAINFO, ca_bundle)
        handle.setopt(pycurl.DNS_CACHE_TIMEOUT, DNS_CACHE_SECONDS)
        handle.setopt(pycurl.NOSIGNAL, 1)
        handle.setopt(pycurl.OPENSOCKETFUNCTION, self.open_socket)
        handle.setopt(pycurl.HEADERFUNCTION, self.header_lines.append)  # no Python frame per line
        handle.setopt(pycurl.WRITEFUNCTION, self.on_body)

    def load(self, request: Request, limits: Limits, token: object, host: str, step: int) -> None:
        """Take a new request: per-request state afresh, and the options that differ (`step`:
        which of the host's shards this is, counted from its own)."""
        self.generation += 1
        self.live = True
        self.request, self.limits, self.token, self.host, self.step = request, limits, token, host, step
        self.delivered_at = datetime.now(UTC)
        self.started = self.looked_at = time.monotonic()
        self.received = 0  # reply bytes seen at the last read-timeout check (headers and body)
        self.moved_at = 0.0  # bytes came after this check (the time of the one before)
        self.last_body_at = 0.0
        self.body.clear()
        self.header_lines.clear()
        self.kept = self.seen = 0
        self.blocked = ""
        self.too_long = False
        handle = self.handle
        handle.setopt(pycurl.URL, request.url)
        self._set_timeouts(limits)
        handle.setopt(pycurl.HTTPHEADER, header_lines(request, self._set_method(request)))

    def _set_timeouts(self, limits: Limits) -> None:
        timeouts = limits.curl_timeouts_ms
        if timeouts != self.timeouts:
            self.handle.setopt(pycurl.CONNECTTIMEOUT_MS, timeouts[0])
            self.handle.setopt(pycurl.TIMEOUT_MS, timeouts[1])
            self.timeouts = timeouts

    def _set_method(self, request: Request) -> bool:
        """The method and body, undoing whatever the handle's last request set; True when a
        body goes out."""
        handle = self.handle
        with_body = request.method == "POST" or request.body is not None
        if with_body:
            handle.setopt(pycurl.POSTFIELDSIZE, len(request.body or b""))
            handle.setopt(pycurl.COPYPOSTFIELDS, request.body or b"")  # also makes it a POST
        else:
            handle.setopt(pycurl.HTTPGET, 1)  # back to a GET without a body, after any POST
        custom = None if request.method in ("GET", "POST") else request.method
        if custom != self.custom_method:
            if custom is None:
                handle.unsetopt(pycurl.CUSTOMREQUEST)
            else:
                handle.setopt(pycurl.CUSTOMREQUEST, custom)
            self.custom_method = custom
        return with_body

    def open_socket(self, purpose: int, address: tuple[int, int, int, tuple[object, ...]]) -> object:
        """libcurl's socket(2): refuse addresses the service must not reach."""
        family, socktype, protocol, sockaddr = address
        peer = ipaddress.ip_address(str(sockaddr[0]))
        if not is_allowed_address(peer, self.allowed):
            self.blocked = self.blocked or refusal(peer)
            return pycurl.SOCKET_BAD
        return _Descriptor(socket.socket(family, socktype, protocol).detach())

    def on_body(self, chunk: bytes) -> int | None:
        """Keep the first body_max_bytes; stop reading (closing the connection) past the drain."""
        self.last_body_at = time.monotonic()
        self.seen += len(chunk)
        room = self.limits.body_max_bytes - self.kept
        if room > 0:
            self.body.append(chunk[:room])
            self.kept += min(room, len(chunk))
        if self.seen > self.limits.body_max_bytes + DRAIN_MAX_BYTES:
            self.too_long = True
            return 0  # libcurl aborts the transfer and closes the connection
        return None

    def retry_after(self) -> str | None:
        """The Retry-After header of the final response (1xx responses come first)."""
        value = None
        for line in self.header_lines:
            name, _, rest = line.partition(b":")
            if line.startswith(b"HTTP/"):
                value = None
            elif name.strip().lower() == b"retry-after":
                value = rest.strip().decode("latin-1")
        return value

    def read_deadline(self, now: float) -> float | None:
        """When this request's read timeout falls, as far as can be told now; None when it has.

        The clock runs from the request being sent (libcurl's PRETRANSFER time) to the first
        byte of the reply, then between bytes. Body bytes are timed as they arrive; header
        bytes after the first are only seen at these checks, so a reply that trickles its
        headers counts as moving if anything came since the last check.
        """
        handle, read_timeout = self.handle, self.limits.read_timeout
        first_byte_after = float(handle.getinfo(pycurl.STARTTRANSFER_TIME))
        if first_byte_after:
            waiting_since = max(self.started + first_byte_after, self.last_body_at)
        else:
            sent_after = float(handle.getinfo(pycurl.PRETRANSFER_TIME))
            if not sent_after:
                self.looked_at = now
                return now + read_timeout  # still connecting: the connect timeout applies
            waiting_since = self.started + sent_after
        received = reply_bytes(handle)
        if received != self.received:
            self.received, self.moved_at = received, self.looked_at
        self.looked_at = now
        due = max(waiting_since, self.moved_at) + read_timeout
        return None if due <= now else due

    def request_sent(self) -> bool:
        """Whether the request has gone out (connected, and sending began)."""
        return bool(self.handle.getinfo(pycurl.PRETRANSFER_TIME))

    def elapsed_ms(self) -> float:
        total = float(self.handle.getinfo(pycurl.TOTAL_TIME))
        return round((total if total > 0 else time.monotonic() - self.started) * 1000, 2)


class _Descriptor:
    """A new socket handed to pycurl, which dup()s the descriptor and drops this object: the
    original is closed then. (A socket.socket dropped unclosed would be closed too, but only
    after building a ResourceWarning whose text looks up the peer: a system call per
    connection, for a warning nobody sees.)"""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __del__(self) -> None:
        os.close(self.fd)


# A read deadline names its slot and which of the slot's requests it belongs to.
_Deadline = tuple[_Slot, int]


def is_live(deadline: _Deadline) -> bool:
    slot, generation = deadline
    return slot.live and slot.generation == generation


class _Shard:
    """One libcurl multi handle, with its own connection cache and its idle handles.

    To find an idle connection for a request, libcurl looks through the connections it has to
    that host one by one: with 2,000 connections to one slow receiver that search cost more
    than the rest of a request. So a host's requests go to a shard of its own (by the host's
    hash) for its first CONNECTIONS_PER_SHARD requests in flight, to the next shard for the
    next ones, and so on: a search covers at most that many, and a host's idle connections
    stay where its next request looks for them.
    """

    def __init__(self, transport: "Transport", connections: int) -> None:
        self.transport = transport
        self.idle: list[_Slot] = []  # handles free for a request, most recently used last
        self.due: float | None = None  # when libcurl's next timer for this shard falls
        self.moved = False  # libcurl ran on this shard since its finished requests were read
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_MAXCONNECTS, connections)
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self.watch_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self.set_timer)

    def watch_socket(self, what: int, fd: int, multi: object, socket_data: object) -> None:
        """libcurl's socket callback: start, change or stop watching one socket."""
        self.transport.watch_socket(self, what, fd)

    def set_timer(self, timeout_ms: int) -> None:
        """libcurl's timer callback: when to call socket_action(SOCKET_TIMEOUT) (-1: never)."""
        self.due = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000

    def act(self, fd: int, flags: int) -> None:
        self.moved = True
        self.multi.socket_action(fd, flags)

    def run_timer(self, now: float) -> None:
        if self.due is not None and now >= self.due:
            self.due = None  # libcurl sets its next one from inside socket_action
            self.act(pycurl.SOCKET_TIMEOUT, 0)


def shard_count(concurrency: int) -> int:
    return max(1, math.ceil(concurrency / CONNECTIONS_PER_SHARD))


class Transport:
    """Requests in flight on libcurl multi handles (`_Shard`), driven by `poll()` from one
    thread; `concurrency` is how many the caller keeps in flight at most."""

    def __init__(
        self, allowed_networks: tuple[IPNetwork, ...], ca_bundle: str = "", concurrency: int = 64, idle: int = 512
    ) -> None:
        self._allowed = allowed_networks
        self._ca_bundle = ca_bundle or certifi.where()
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[_Shard, int]] = {}  # descriptor -> its shard, epoll events
        self._read_deadlines: Deadlines[_Deadline] = Deadlines()
        count = shard_count(concurrency)
        self._shards = [_Shard(self, math.ceil(connection_cache_size(concurrency, idle) / count)) for _ in range(count)]
        # DNS answers and TLS sessions shared by every handle of every shard: a new connection
        # to a host resumes an earlier connection's session (an abbreviated handshake;
        # tests/test_transport.py checks it at the receiver), and a name is looked up once.
        self._share = pycurl.CurlShare()
        self._share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_DNS)
        self._share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_SSL_SESSION)
        # Per host with requests out: how many in each shard it uses, from its own shard on.
        self._host_in_flight: dict[str, list[int]] = {}
        self._active: dict[pycurl.Curl, _Slot] = {}
        self._timed_out: list[_Slot] = []

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def in_flight_slots(self) -> list[_Slot]:
        """The requests in flight (for measuring and tests)."""
        return list(self._active.values())

    def start(self, request: Request, limits: Limits, token: object) -> None:
        """Begin sending; the outcome comes back from poll() with the token."""
        host = request.host or host_of(request.url)
        step = self._take_a_place(host)
        shard = self._shards[(hash(host) + step) % len(self._shards)]
        slot = shard.idle.pop() if shard.idle else _Slot(self._allowed, self._ca_bundle, self._share, shard)
        slot.load(request, limits, token, host, step)
        self._active[slot.handle] = slot
        self._read_deadlines.add(slot.started + limits.read_timeout, (slot, slot.generation))
        slot.shard.multi.add_handle(slot.handle)  # libcurl asks, through its timer, to run at once

    def poll(self, timeout: float) -> list[tuple[object, Response]]:
        """Wait up to timeout for a socket or a timer, move on what is ready; return the
        requests that finished."""
        if not self._active:
            return []
        watched = self._watched
        for fd, events in self._epoll.poll(self._wait_seconds(timeout)):
            # libcurl may have let go of a socket while acting on an earlier one of this batch
            # (a full connection cache closes its oldest idle connection): skip its events.
            if (entry := watched.get(fd)) is not None:
                entry[0].act(fd, _CURL_FLAGS[events & 31])
        now = time.monotonic()
        for shard in self._shards:
            shard.run_timer(now)
        self._expire_silent_requests(now)
        return self._collect()

    def abandon(self) -> None:
        """Drop every request in flight (their connections close); nothing comes back for them."""
        for handle in list(self._active):
            self._park(self._release(handle))

    def close(self) -> None:
        for slot in self._active.values():
            slot.shard.multi.remove_handle(slot.handle)
        for slot in [*self._active.values(), *(slot for shard in self._shards for slot in shard.idle)]:
            slot.handle.close()
        self._active.clear()
        for shard in self._shards:
            shard.idle.clear()
        self._read_deadlines.clear()
        for shard in self._shards:
            shard.multi.close()
        self._share.close()
        self._epoll.close()

    def _take_a_place(self, host: str) -> int:
        """Which shard a host's next request goes to, as steps from the host's own: the first
        with fewer than CONNECTIONS_PER_SHARD of its requests out. A request that lands frees
        a place where its connection waits idle, and the next request takes that place."""
        counts = self._host_in_flight.setdefault(host, [])
        for step, count in enumerate(counts):
            if count < CONNECTIONS_PER_SHARD:
                counts[step] += 1
                return step
        counts.append(1)
        return len(counts) - 1

    def _give_back_the_place(self, slot: _Slot) -> None:
        counts = self._host_in_flight[slot.host]
        counts[slot.step] -= 1
        while counts and not counts[-1]:
            counts.pop()
        if not counts:
            del self._host_in_flight[slot.host]

    # --- the event loop ------------------------------------------------------------------

    def _wait_seconds(self, timeout: float) -> float:
        """Up to timeout, but no later than the next timer (libcurl's or a read deadline)."""
        wait = timeout
        now = time.monotonic()
        for shard in self._shards:
            if shard.due is not None:
                wait = min(wait, shard.due - now)
        due = self._read_deadlines.next_due()
        if due is not None:
            wait = min(wait, due - now)
        return max(0.0, wait)

    def watch_socket(self, shard: _Shard, what: int, fd: int) -> None:
        """A shard's socket callback: start, change or stop watching one socket."""
        if what == pycurl.POLL_REMOVE:
            if self._watched.pop(fd, None) is not None:
                self._epoll.unregister(fd)
            return
        events = _EPOLL_EVENTS[what]
        if fd in self._watched:
            try:
                self._epoll.modify(fd, events)
            except FileNotFoundError:  # closed, and its number reused: watch it afresh
                self._epoll.register(fd, events)
        else:
            self._epoll.register(fd, events)
        self._watched[fd] = (shard, events)

    def _expire_silent_requests(self, now: float) -> None:
        """Read timeouts: libcurl has a total timeout but no per-read one; a receiver that
        answers nothing, or stops mid-reply, is cut off here. Only the deadlines that fell are
        looked at; one that moved (bytes came) goes back in the heap with its new time."""
        for slot, generation in self._read_deadlines.pop_due(now, is_live):
            due = slot.read_deadline(now)
            if due is None:
                slot.live = False
                self._timed_out.append(slot)
            else:
                self._read_deadlines.add(due, (slot, generation))

    def _collect(self) -> list[tuple[object, Response]]:
        finished: list[tuple[object, Response]] = []
        for slot in self._timed_out:
            self._release(slot.handle)
            finished.append((slot.token, failure(slot, "read timeout", transient=True)))
            self._park(slot)
        self._timed_out.clear()
        for shard in self._shards:
            if shard.moved:
                shard.moved = False
                self._collect_from(shard, finished)
        return finished

    def _collect_from(self, shard: _Shard, finished: list[tuple[object, Response]]) -> None:
        while True:
            queued, succeeded, failed = shard.multi.info_read()
            for handle in succeeded:
                slot = self._release(handle)
                finished.append((slot.token, response_of(slot)))
                self._park(slot)
            for handle, code, message in failed:
                slot = self._release(handle)
                finished.append((slot.token, error_response(slot, code, message)))
                self._park(slot)
            if not queued:
                return

    def _release(self, handle: pycurl.Curl) -> _Slot:
        """Take a request's handle out of libcurl (its figures stay readable until parked)."""
        slot = self._active.pop(handle)
        slot.live = False
        slot.shard.multi.remove_handle(handle)
        self._give_back_the_place(slot)
        return slot

    @staticmethod
    def _park(slot: _Slot) -> None:
        """A released handle waits in its shard for the next request, or is closed if enough
        wait there already (a new one is cheap)."""
        if len(slot.shard.idle) < CONNECTIONS_PER_SHARD:
            slot.shard.idle.append(slot)
        else:
            slot.handle.close()


def response_of(slot: _Slot) -> Response:
    handle = slot.handle
    status = int(handle.getinfo(pycurl.RESPONSE_CODE))
    body = b"".join(slot.body).decode(declared_charset(handle.getinfo(pycurl.CONTENT_TYPE)), errors="replace")
    retry_after = slot.retry_after() if status == 429 or status >= 500 else None
    return Response(
        delivered_at=slot.delivered_at,
        status=status,
        elapsed_ms=slot.elapsed_ms(),
        body=body,
        retry_after_seconds=parse_retry_after(retry_after, datetime.now(UTC)),
    )


def error_response(slot: _Slot, code: int, message: str) -> Response:
    if code == pycurl.E_WRITE_ERROR and slot.too_long:
        return response_of(slot)  # we stopped reading a long reply on purpose
    error, transient = describe_error(slot, code, message)
    return failure(slot, error, transient)


def failure(slot: _Slot, error: str, transient: bool) -> Response:
    return Response(
        delivered_at=slot.delivered_at,
        status=None,
        elapsed_ms=slot.elapsed_ms(),
        error=error,
        transient=transient,
    )


@cache
def process_transport() -> Transport:
    """The worker process's transport: its connections outlive each job."""
    return Transport(
        parse_networks(settings.DELIVERY_ALLOW_NETWORKS),
        settings.DELIVERY_CA_BUNDLE,
        settings.DELIVERY_CONCURRENCY,
        settings.DELIVERY_IDLE_CONNECTIONS,
    )


def reply_bytes(handle: pycurl.Curl) -> int:
    """Bytes of the reply received so far: headers and body."""
    return int(handle.getinfo(pycurl.HEADER_SIZE)) + int(handle.getinfo(pycurl.SIZE_DOWNLOAD_T))


# libcurl's codes for failures that say "this URL can never work" rather than "not now".
_PERMANENT_ERRORS = {
    pycurl.E_UNSUPPORTED_PROTOCOL: "invalid URL",
    pycurl.E_URL_MALFORMAT: "invalid URL",
    # The receiver's certificate does not check out (untrusted issuer, wrong name, expired),
    # or the CA bundle cannot be read: sending again changes nothing until someone fixes it.
    pycurl.E_PEER_FAILED_VERIFICATION: "TLS certificate not accepted",
    pycurl.E_SSL_ISSUER_ERROR: "TLS certificate not accepted",
    pycurl.E_SSL_PINNEDPUBKEYNOTMATCH: "TLS certificate not accepted",
    pycurl.E_SSL_CACERT_BADFILE: "DELIVERY_CA_BUNDLE cannot be read",
}


def describe_error(slot: _Slot, code: int, message: str) -> tuple[str, bool]:
    """A short error text and whether the failure is transient."""
    if slot.blocked:
        return slot.blocked, False
    if is_garbled_reply(slot, code):
        # The receiver's fault, and as passing as a 502 from a proxy restarting behind it.
        return f"protocol error: the reply is not HTTP ({message})", True
    if code in _PERMANENT_ERRORS:
        return f"{_PERMANENT_ERRORS[code]}: {message}", False
    if code == pycurl.E_OPERATION_TIMEDOUT:
        return describe_timeout(slot, message), True
    if code == pycurl.E_COULDNT_RESOLVE_HOST:
        return f"name not resolved: {message}", True
    if code == pycurl.E_SSL_CONNECT_ERROR:
        return f"TLS handshake failed: {message}", True
    os_errno = int(slot.handle.getinfo(pycurl.OS_ERRNO))
    if os_errno:
        return f"connection error: [Errno {os_errno}] {os.strerror(os_errno)}", True
    return f"connection error: {message}", True


def is_garbled_reply(slot: _Slot, code: int) -> bool:
    """Whether the receiver answered bytes that are not HTTP. libcurl says "weird server reply"
    (a header line without a colon), or "unsupported protocol" for a reply with no status line
    (HTTP/0.9, which it refuses): the code it also gives a URL it cannot send, but a URL it
    cannot send never had its request go out."""
    if code == pycurl.E_FTP_WEIRD_SERVER_REPLY:  # CURLE_WEIRD_SERVER_REPLY, under its old name
        return True
    return code == pycurl.E_UNSUPPORTED_PROTOCOL and int(slot.handle.getinfo(pycurl.REQUEST_SIZE)) > 0


def describe_timeout(slot: _Slot, message: str) -> str:
    """Which stage a timed-out request was in: resolving, connecting, the TLS handshake, or
    waiting for (the rest of) the reply."""
    handle, limits = slot.handle, slot.limits
    if message.startswith("Resolving timed out"):
        return f"name not resolved: no answer within {limits.connect_timeout:g} s"
    if handle.getinfo(pycurl.CONNECT_TIME) == 0:
        return "connect timeout"
    if slot.request.url[:6].lower() == "https:" and handle.getinfo(pycurl.APPCONNECT_TIME) == 0:
        return f"connect timeout: TLS handshake not finished within {limits.connect_timeout:g} s"
    if not reply_bytes(handle):
        return f"total timeout: no reply within {limits.total_timeout:g} s"
    return f"total timeout: no complete reply within {limits.total_timeout:g} s"
