"""Known senders: which API key a request presents, whether it may be served, and the rate
limits it is charged against.

A sender presents its key as `Authorization: Bearer <key>` or `X-API-Key: <key>` (the first
wins when both are sent). Keys are looked up by their SHA-256 in a table each web process
holds in memory and reads again every KEYS_CACHE_SECONDS: one query per process per interval,
none per request, and a key revoked in admin stops working everywhere within that interval
(at once in the process that saved it). Rate limits are charged by the inbox's append script,
in the round trip that queues the request (postbackproject/inbox.py).
"""

import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from django.conf import settings
from django.db import DatabaseError
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.http import HttpRequest

from ingestion.models import KEY_PREFIX, SHOWN_LENGTH, SenderKey, hash_key
from postbackproject.addresses import parse_address, unmapped
from postbackproject.inbox import RateLimit
from postbackproject.inbox import RateLimited as RateLimited  # re-exported: the view catches it from here

logger = logging.getLogger(__name__)

# How long a process trusts its copy of the sender keys: the longest a revoked key still works.
KEYS_CACHE_SECONDS = 5.0
# Seconds a sender should wait when the keys cannot be read (database down since the start).
RETRY_AFTER_SECONDS = 5
CHALLENGE = 'Bearer realm="postbacks"'
# IPv6 senders are limited per /64, the block one customer gets: per address, a single host
# could take a fresh address for every request.
IPV6_PREFIX = 64


@dataclass(frozen=True)
class KnownKey:
    id: int
    active: bool
    rate_limit: float | None  # requests per second; None: the default; 0: no limit


class Refused(Exception):
    """The request is not served: its status, the message for the sender and headers to add."""

    def __init__(self, status: int, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass(frozen=True)
class Admission:
    """A request let in: the rate limits to charge it against, and who sent it, as its
    postbacks record it ("key 12" for sender key 12, else the client's address)."""

    rate_limits: list[RateLimit]
    sender: str


def admit(request: HttpRequest, address: str) -> Admission:
    """Who sent the request and what limits it is charged against; Refused with 401 when its
    key is wrong, or missing while keys are required."""
    presented = presented_key(request)
    if presented is None:
        if settings.INGEST_REQUIRE_SENDER_KEY:
            raise unauthorized("a sender key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        if settings.INGEST_RATE_LIMIT_PER_ADDRESS <= 0:
            return Admission([], address)  # no limit: the address need not be parsed
        per_address = RateLimit.per_address(address_bucket(address), settings.INGEST_RATE_LIMIT_PER_ADDRESS)
        return Admission(limits(per_address), address)
    known = KeyTable.keys().get(hash_key(presented))
    if known is None or not known.active:
        raise unauthorized("the sender key is not valid (unknown or revoked)", 'error="invalid_token"')
    per_second = settings.INGEST_RATE_LIMIT_PER_KEY if known.rate_limit is None else known.rate_limit
    return Admission(limits(RateLimit.per_sender_key(known.id, per_second)), f"key {known.id}")


def presented_key(request: HttpRequest) -> str | None:
    """The key the request presents ("" for an empty one: a sender that tried), or None."""
    # From META, not request.headers: building the headers mapping costs every ingest ~14 µs.
    authorization: str = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    api_key: str | None = request.META.get("HTTP_X_API_KEY")
    return None if api_key is None else api_key.strip()


def log_fields(request: HttpRequest) -> dict[str, str]:
    """For the ingest log line: the prefix of the key presented, to tell which senders still use
    a key being replaced. Only keys of ours: another secret pasted by mistake is not logged."""
    presented = presented_key(request)
    if presented and presented.startswith(KEY_PREFIX):
        return {"sender_key": presented[:SHOWN_LENGTH]}
    return {}


def limits(limit: RateLimit) -> list[RateLimit]:
    return [limit] if limit.per_second > 0 else []


def address_bucket(address: str) -> str:
    """The address as rate limits count it: IPv4 as is, IPv6 by its /64. An IPv4-mapped IPv6
    address (`::ffff:1.2.3.4`) is the IPv4 client it maps, not one of the /64 `::` holds with
    `::1` and every other mapped client."""
    parsed = parse_address(address)
    if parsed is None:
        return address
    parsed = unmapped(parsed)
    if parsed.version == 6:
        return str(ipaddress.ip_network(f"{parsed}/{IPV6_PREFIX}", strict=False))
    return str(parsed)


def unauthorized(message: str, detail: str = "") -> Refused:
    challenge = f"{CHALLENGE}, {detail}" if detail else CHALLENGE
    return Refused(401, message, {"WWW-Authenticate": challenge})


def too_many(exc: RateLimited) -> Refused:
    limit = exc.limit
    message = (
        f"rate limit of this {limit.subject} ({limit.per_second:g} requests per second) reached; "
        "nothing was accepted, send again after Retry-After seconds"
    )
    return Refused(429, message, {"Retry-After": str(exc.retry_after)})


class KeyTable:
    """Every sender key's digest -> KnownKey, as this process last read them."""

    _keys: ClassVar[dict[str, KnownKey] | None] = None
    _read_at: ClassVar[float] = 0.0

    @classmethod
    def keys(cls) -> dict[str, KnownKey]:
        """The table, read again when older than KEYS_CACHE_SECONDS. While the database is
        unreachable the last one read serves; if none was, Refused with 503."""
        now = time.monotonic()
        if cls._keys is None or now - cls._read_at >= KEYS_CACHE_SECONDS:
            try:
                cls._keys = read_keys()
            except DatabaseError as exc:
                logger.warning("sender keys unreadable; using the last ones read", exc_info=True)
                if cls._keys is None:
                    raise Refused(
                        503, "sender keys cannot be checked now", {"Retry-After": str(RETRY_AFTER_SECONDS)}
                    ) from exc
            cls._read_at = now
        return cls._keys

    @classmethod
    def forget(cls) -> None:
        cls._keys = None


def read_keys() -> dict[str, KnownKey]:
    rows = SenderKey.objects.values_list("key_hash", "id", "active", "rate_limit")
    return {digest: KnownKey(key_id, active, rate_limit) for digest, key_id, active, rate_limit in rows}


@receiver(post_save, sender=SenderKey)
@receiver(post_delete, sender=SenderKey)
def forget_keys(**kwargs: Any) -> None:
    """A key issued, changed or deleted here counts in this process at once."""
    KeyTable.forget()
