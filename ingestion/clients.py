"""Who sent a request: the peer that connected, or the client a trusted proxy names.

X-Real-IP and X-Forwarded-For are whatever the peer writes. Believed from anyone, they let a
sender choose the address its per-address rate limit is counted against (rotating the header
gave 10 of 10 requests accepted against a limit of 2 a second), and write the log's `client`.
So they are read only when the peer is one of TRUSTED_PROXIES (production's nginx).
"""

from functools import lru_cache

from django.conf import settings
from django.http import HttpRequest

from postbackproject.addresses import IPNetwork, is_within, parse_address, parse_networks


def client_address(request: HttpRequest) -> str:
    """The sender's address: the peer's, unless the peer is a trusted proxy that names one."""
    peer: str = request.META.get("REMOTE_ADDR", "")
    proxies = trusted_proxies()
    if not proxies:
        return peer  # the default: nothing to parse on the hot path
    address = parse_address(peer)
    if address is None or not is_within(address, proxies):
        return peer
    return forwarded_client(request, proxies) or peer


def forwarded_client(request: HttpRequest, proxies: tuple[IPNetwork, ...]) -> str | None:
    """The client a trusted proxy names: its X-Real-IP, else the nearest X-Forwarded-For hop
    that is not a proxy of ours (the hops further left were written by the client itself)."""
    real_ip = parse_address(request.META.get("HTTP_X_REAL_IP", ""))
    if real_ip is not None:
        return str(real_ip)
    for hop in reversed(request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")):
        address = parse_address(hop)
        if address is None:
            return None
        if not is_within(address, proxies):
            return str(address)
    return None


def trusted_proxies() -> tuple[IPNetwork, ...]:
    return networks_of(tuple(settings.TRUSTED_PROXIES))


@lru_cache(maxsize=4)
def networks_of(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Parsed once per process (the system check ingestion.E003 refuses a list that does not parse)."""
    return parse_networks(cidrs)
