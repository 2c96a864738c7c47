"""HTTP to receivers: one keep-alive connection pool per worker process, guarded against SSRF.

The service sends requests to URLs that strangers give it. Checking the URL's text is no
defence (`http://2130706433/` is 127.0.0.1 to the resolver), and a check before resolving can
be raced by DNS. So the check runs on the socket itself, after it connects and before a byte
is sent: the peer address must be public, or inside DELIVERY_ALLOW_NETWORKS.
"""

import codecs
import http.cookiejar
import ipaddress
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.utils import parsedate_to_datetime
from functools import cache
from typing import Any

import requests
import urllib3
from django.conf import settings
from django.utils import timezone
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

USER_AGENT = "postback-delivery/1.0"
# Response bytes past the logged part that are still read, to keep the connection reusable.
DRAIN_MAX_BYTES = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedDestination(Exception):
    """The receiver's address is private, loopback, link-local or otherwise not public."""


@cache
def allowed_networks() -> tuple[IPNetwork, ...]:
    return tuple(
        ipaddress.ip_network(cidr.strip(), strict=False) for cidr in settings.DELIVERY_ALLOW_NETWORKS if cidr.strip()
    )


def is_allowed_address(address: IPAddress, allowed: Iterable[IPNetwork]) -> bool:
    """Public unicast addresses are allowed; anything else only inside an allowed network."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return True
    return address.is_global and not address.is_multicast


def _check_peer(sock: socket.socket) -> None:
    peer = ipaddress.ip_address(sock.getpeername()[0])
    if not is_allowed_address(peer, allowed_networks()):
        sock.close()
        raise BlockedDestination(f"destination address {peer} is not public and not in DELIVERY_ALLOW_NETWORKS")


class GuardedHTTPConnection(HTTPConnection):
    """Checks the peer of every new socket before anything is sent on it."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_peer(sock)
        return sock


class GuardedHTTPSConnection(GuardedHTTPConnection, HTTPSConnection):
    """The same check, before the TLS handshake."""


class GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """requests adapter whose pools open only guarded connections and never retry on their own."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": GuardedHTTPConnectionPool,
            "https": GuardedHTTPSConnectionPool,
        }


def build_session(pool_size: int) -> requests.Session:
    session = requests.Session()
    # No proxies or .netrc from the environment, and no cookies carried between receivers.
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.headers["User-Agent"] = USER_AGENT
    adapter = GuardedAdapter(pool_connections=64, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@cache
def get_session() -> requests.Session:
    """The worker process's session, shared by its delivery threads."""
    return build_session(settings.DELIVERY_CONCURRENCY)


@dataclass(frozen=True)
class Request:
    postback_id: str
    attempt: int
    method: str
    url: str
    body: bytes | None


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


def _read_capped(response: requests.Response, max_bytes: int) -> str:
    """Up to max_bytes of the body, decoded leniently.

    The rest is read and dropped up to DRAIN_MAX_BYTES, so that a short reply leaves its
    connection ready for the next request; a longer one closes the connection instead, so a
    huge response costs no more than its first bytes.
    """
    raw = response.raw
    head = raw.read(max_bytes, decode_content=True) if max_bytes else b""
    if len(head) == max_bytes:
        rest = raw.read(DRAIN_MAX_BYTES, decode_content=True)
        if len(rest) == DRAIN_MAX_BYTES and raw.read(1, decode_content=True):
            response.close()
    return head.decode(_declared_charset(response.headers.get("Content-Type")), errors="replace")


def _declared_charset(content_type: str | None) -> str:
    """The charset the receiver declared, else UTF-8 (requests would guess ISO-8859-1 for text/*)."""
    message = Message()
    message["Content-Type"] = content_type or ""
    charset = message.get_content_charset()
    try:
        return codecs.lookup(charset).name if charset else "utf-8"
    except LookupError:
        return "utf-8"


def _describe(exc: BaseException) -> tuple[str, bool]:
    """A short error text and whether the failure is transient."""
    if isinstance(exc, BlockedDestination):
        return str(exc), False
    if isinstance(exc, requests.ConnectTimeout):
        return "connect timeout", True
    if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
        return "read timeout", True
    if isinstance(
        exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema)
    ):
        return f"invalid URL: {exc}", False
    if isinstance(exc, requests.ConnectionError):
        return f"connection error: {_root_cause(exc)}", True
    return f"{type(exc).__name__}: {exc}", True


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's text: "[Errno 111] Connection refused", not three wrappers."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return str(exc)[:300]


def send(request: Request, connect_timeout: float, read_timeout: float, body_max_bytes: int) -> Response:
    """Make one request; never raises for anything the receiver or the network does."""
    headers = {"X-Postback-Id": request.postback_id, "X-Postback-Attempt": str(request.attempt)}
    if request.body is not None:
        headers["Content-Type"] = "application/json"
    delivered_at = timezone.now()
    started = time.perf_counter()
    try:
        with get_session().request(
            request.method,
            request.url,
            data=request.body,
            headers=headers,
            timeout=(connect_timeout, read_timeout),
            allow_redirects=False,
            stream=True,
        ) as response:
            body = _read_capped(response, body_max_bytes)
            elapsed_ms = (time.perf_counter() - started) * 1000
            return Response(
                delivered_at=delivered_at,
                status=response.status_code,
                elapsed_ms=elapsed_ms,
                body=body,
                retry_after_seconds=parse_retry_after(response.headers.get("Retry-After"), timezone.now()),
            )
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded attempt
        error, transient = _describe(exc)
        elapsed_ms = (time.perf_counter() - started) * 1000
        return Response(delivered_at=delivered_at, status=None, elapsed_ms=elapsed_ms, error=error, transient=transient)
