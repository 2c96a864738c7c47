"""HTTP to receivers: many requests in flight on one thread, through libcurl's multi interface.

A `requests.Session` call costs about 620 µs of CPU here and needs a thread per request in
flight; libcurl's multi interface runs the whole event loop in C, about 13 µs a request, and
keeps hundreds in flight from one thread (docs/decisions.md, "libcurl"). One `Transport` per
worker process keeps its keep-alive connections across jobs.

The service sends requests to URLs that strangers give it. Checking the URL's text is no
defence (`http://2130706433/` is 127.0.0.1 to the resolver), and a check before resolving can
be raced by DNS. So the check runs where libcurl opens each socket, on the resolved address it
is about to connect to: it must be public, or inside DELIVERY_ALLOW_NETWORKS. Nothing is sent,
not even a TCP SYN, to any other address.
"""

import codecs
import ipaddress
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.utils import parsedate_to_datetime
from functools import cache, lru_cache

import certifi
import pycurl
from django.conf import settings
from django.utils import timezone

USER_AGENT = "postback-delivery/1.0"
# Response bytes past the logged part that are still read, to keep the connection reusable;
# a longer reply closes its connection instead of being read to the end.
DRAIN_MAX_BYTES = 64 * 1024
# Connections kept open for reuse, per worker process, beyond those in use.
IDLE_CONNECTIONS = 256

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Request:
    postback_id: str
    attempt: int
    method: str
    url: str  # exactly as it goes on the wire (ASCII)
    body: bytes | None
    headers: tuple[str, ...] = ()  # "Name: value" lines added to the product's own (signatures)


@dataclass(frozen=True)
class Limits:
    """How long one request may take, and how much of its reply is kept."""

    connect_timeout: float  # to establish the connection
    read_timeout: float  # between bytes of the reply, and from the request to its first byte
    total_timeout: float  # connect to last byte, whatever the receiver does
    body_max_bytes: int


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


def is_allowed_address(address: IPAddress, allowed: Iterable[IPNetwork]) -> bool:
    """Public unicast addresses are allowed; anything else only inside an allowed network."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return True
    return address.is_global and not address.is_multicast


def parse_allowed_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip())


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


class _Transfer:
    """One request in flight: libcurl's callbacks land here."""

    __slots__ = (
        "allowed",
        "blocked",
        "body",
        "delivered_at",
        "header_lines",
        "kept",
        "last_progress_at",
        "limits",
        "received",
        "request",
        "seen",
        "started",
        "token",
        "too_long",
    )

    def __init__(self, request: Request, limits: Limits, token: object, allowed: tuple[IPNetwork, ...]) -> None:
        self.request = request
        self.limits = limits
        self.token = token
        self.allowed = allowed
        self.delivered_at = timezone.now()
        self.started = time.monotonic()
        self.received = 0  # reply bytes seen at the last look (headers and body)
        self.last_progress_at = 0.0
        self.body: list[bytes] = []
        self.kept = 0
        self.seen = 0
        self.header_lines: list[bytes] = []
        self.blocked = ""
        self.too_long = False

    def open_socket(self, purpose: int, address: tuple[int, int, int, tuple[object, ...]]) -> object:
        """libcurl's socket(2): refuse addresses the service must not reach."""
        family, socktype, protocol, sockaddr = address
        peer = ipaddress.ip_address(str(sockaddr[0]))
        if not is_allowed_address(peer, self.allowed):
            self.blocked = (
                self.blocked or f"destination address {peer} is not public and not in DELIVERY_ALLOW_NETWORKS"
            )
            return pycurl.SOCKET_BAD
        return socket.socket(family, socktype, protocol)

    def on_body(self, chunk: bytes) -> int | None:
        """Keep the first body_max_bytes; stop reading (closing the connection) past the drain."""
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


class Transport:
    """Requests in flight on a libcurl multi handle, driven by `poll()` from one thread."""

    def __init__(self, allowed_networks: tuple[IPNetwork, ...], ca_bundle: str = "") -> None:
        self._allowed = allowed_networks
        self._ca_bundle = ca_bundle or certifi.where()
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_MAXCONNECTS, IDLE_CONNECTIONS)
        self._idle: list[pycurl.Curl] = []
        self._active: dict[pycurl.Curl, _Transfer] = {}
        self._aborted: list[tuple[pycurl.Curl, str]] = []

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def start(self, request: Request, limits: Limits, token: object) -> None:
        """Begin sending; the outcome comes back from poll() with the token."""
        transfer = _Transfer(request, limits, token, self._allowed)
        handle = self._idle.pop() if self._idle else pycurl.Curl()
        handle.reset()
        self._configure(handle, transfer)
        self._active[handle] = transfer
        self._multi.add_handle(handle)

    def poll(self, timeout: float) -> list[tuple[object, Response]]:
        """Wait up to timeout for activity, move every transfer on; return the finished ones."""
        if not self._active:
            return []
        self._perform()
        wait = self._multi.timeout()  # ms until libcurl's own next timer; -1 when none
        wait_seconds = timeout if wait < 0 else min(timeout, wait / 1000)
        if wait_seconds > 0 and self._multi.select(wait_seconds) == -1:
            time.sleep(wait_seconds)  # no sockets to wait on yet (resolving): wait out the timer
        self._perform()
        self._abort_silent_transfers()
        return self._collect()

    def abandon(self) -> None:
        """Drop every request in flight (their connections close); nothing comes back for them."""
        for handle in list(self._active):
            self._release(handle)

    def close(self) -> None:
        for handle in list(self._active):
            self._multi.remove_handle(handle)
            handle.close()
        for handle in self._idle:
            handle.close()
        self._active.clear()
        self._idle.clear()
        self._multi.close()

    def _configure(self, handle: pycurl.Curl, transfer: _Transfer) -> None:
        request, limits = transfer.request, transfer.limits
        headers = [
            f"X-Postback-Id: {request.postback_id}",
            f"X-Postback-Attempt: {request.attempt}",
            "Expect:",  # no 100-continue round trip before a body
        ]
        handle.setopt(pycurl.URL, request.url)
        handle.setopt(pycurl.PATH_AS_IS, 1)  # send the path as given: no dot-segment squashing
        handle.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        handle.setopt(pycurl.PROXY, "")  # no proxy from the environment
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        handle.setopt(pycurl.USERAGENT, USER_AGENT)
        handle.setopt(pycurl.CAINFO, self._ca_bundle)
        handle.setopt(pycurl.NOSIGNAL, 1)
        handle.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, round(limits.connect_timeout * 1000)))
        handle.setopt(pycurl.TIMEOUT_MS, max(1, round(limits.total_timeout * 1000)))
        handle.setopt(pycurl.OPENSOCKETFUNCTION, transfer.open_socket)
        handle.setopt(pycurl.HEADERFUNCTION, transfer.header_lines.append)  # no Python frame per line
        handle.setopt(pycurl.WRITEFUNCTION, transfer.on_body)
        if request.method == "POST" or request.body is not None:
            headers.append("Content-Type: application/json")
            handle.setopt(pycurl.POSTFIELDSIZE, len(request.body or b""))
            handle.setopt(pycurl.COPYPOSTFIELDS, request.body or b"")
        if request.method not in ("GET", "POST"):
            handle.setopt(pycurl.CUSTOMREQUEST, request.method)
        headers.extend(request.headers)
        handle.setopt(pycurl.HTTPHEADER, headers)

    def _perform(self) -> None:
        while self._multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass

    def _abort_silent_transfers(self) -> None:
        """Read timeout: no byte for read_timeout, counted from the request being sent.

        libcurl has a total timeout but no per-read one; a receiver that answers nothing, or
        stops mid-reply, is cut off here.
        """
        now = time.monotonic()
        for handle, transfer in self._active.items():
            read_timeout = transfer.limits.read_timeout
            if now - transfer.started <= read_timeout:
                continue  # fast transfers are never looked at: no cost on the hot path
            received = reply_bytes(handle)
            if received != transfer.received:
                transfer.received, transfer.last_progress_at = received, now
            if received:
                waiting_since = transfer.last_progress_at
            else:
                connected_after = handle.getinfo(pycurl.PRETRANSFER_TIME)  # 0 until connected
                if connected_after == 0:
                    continue  # still connecting: the connect timeout applies
                waiting_since = transfer.started + connected_after
            if now - waiting_since > read_timeout:
                self._aborted.append((handle, "read timeout"))

    def _collect(self) -> list[tuple[object, Response]]:
        finished: list[tuple[object, Response]] = []
        for handle, error in self._aborted:
            transfer = self._release(handle)
            finished.append((transfer.token, self._failure(handle, transfer, error, transient=True)))
        self._aborted.clear()
        while True:
            queued, succeeded, failed = self._multi.info_read()
            for handle in succeeded:
                transfer = self._release(handle)
                finished.append((transfer.token, self._response(handle, transfer)))
            for handle, code, message in failed:
                transfer = self._release(handle)
                finished.append((transfer.token, self._error_response(handle, transfer, code, message)))
            if not queued:
                return finished

    def _release(self, handle: pycurl.Curl) -> _Transfer:
        transfer = self._active.pop(handle)
        self._multi.remove_handle(handle)
        self._idle.append(handle)
        return transfer

    def _response(self, handle: pycurl.Curl, transfer: _Transfer) -> Response:
        status = int(handle.getinfo(pycurl.RESPONSE_CODE))
        body = b"".join(transfer.body).decode(declared_charset(handle.getinfo(pycurl.CONTENT_TYPE)), errors="replace")
        retry_after = transfer.retry_after() if status == 429 or status >= 500 else None
        return Response(
            delivered_at=transfer.delivered_at,
            status=status,
            elapsed_ms=self._elapsed_ms(handle, transfer),
            body=body,
            retry_after_seconds=parse_retry_after(retry_after, timezone.now()),
        )

    def _error_response(self, handle: pycurl.Curl, transfer: _Transfer, code: int, message: str) -> Response:
        if code == pycurl.E_WRITE_ERROR and transfer.too_long:
            return self._response(handle, transfer)  # we stopped reading a long reply on purpose
        error, transient = describe_error(handle, transfer, code, message)
        return self._failure(handle, transfer, error, transient)

    def _failure(self, handle: pycurl.Curl, transfer: _Transfer, error: str, transient: bool) -> Response:
        return Response(
            delivered_at=transfer.delivered_at,
            status=None,
            elapsed_ms=self._elapsed_ms(handle, transfer),
            error=error,
            transient=transient,
        )

    @staticmethod
    def _elapsed_ms(handle: pycurl.Curl, transfer: _Transfer) -> float:
        total = float(handle.getinfo(pycurl.TOTAL_TIME))
        return round((total if total > 0 else time.monotonic() - transfer.started) * 1000, 2)


@cache
def process_transport() -> Transport:
    """The worker process's transport: its connections outlive each job."""
    return Transport(parse_allowed_networks(settings.DELIVERY_ALLOW_NETWORKS), settings.DELIVERY_CA_BUNDLE)


def reply_bytes(handle: pycurl.Curl) -> int:
    """Bytes of the reply received so far: headers and body."""
    return int(handle.getinfo(pycurl.HEADER_SIZE)) + int(handle.getinfo(pycurl.SIZE_DOWNLOAD_T))


# libcurl's codes for failures that say "this URL can never work" rather than "not now".
_PERMANENT_ERRORS = {
    pycurl.E_UNSUPPORTED_PROTOCOL: "invalid URL",
    pycurl.E_URL_MALFORMAT: "invalid URL",
}


def describe_error(handle: pycurl.Curl, transfer: _Transfer, code: int, message: str) -> tuple[str, bool]:
    """A short error text and whether the failure is transient."""
    if transfer.blocked:
        return transfer.blocked, False
    if code in _PERMANENT_ERRORS:
        return f"{_PERMANENT_ERRORS[code]}: {message}", False
    if code == pycurl.E_OPERATION_TIMEDOUT:
        if handle.getinfo(pycurl.CONNECT_TIME) == 0:
            return "connect timeout", True
        if not reply_bytes(handle):
            return f"total timeout: no reply within {transfer.limits.total_timeout:g} s", True
        return f"total timeout: no complete reply within {transfer.limits.total_timeout:g} s", True
    if code == pycurl.E_COULDNT_RESOLVE_HOST:
        return f"name not resolved: {message}", True
    os_errno = int(handle.getinfo(pycurl.OS_ERRNO))
    if os_errno:
        return f"connection error: [Errno {os_errno}] {os.strerror(os_errno)}", True
    return f"connection error: {message}", True
