"""IP addresses and the networks that settings list (DELIVERY_ALLOW_NETWORKS, TRUSTED_PROXIES):
pure helpers that ingestion, delivery and the system checks share. No Django, so that
deploy/gunicorn.conf.py can read the same lists the same way."""

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The networks a setting lists, blanks skipped; a single address is its own network, and
    host bits are dropped (`10.0.0.5/8` is `10.0.0.0/8`). ValueError on anything else."""
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip())


def invalid_networks(cidrs: Iterable[str]) -> list[str]:
    """The entries of a setting that parse_networks refuses, for the system checks."""
    invalid = []
    for cidr in cidrs:
        try:
            parse_networks([cidr])
        except ValueError:
            invalid.append(cidr)
    return invalid


def parse_address(text: str) -> IPAddress | None:
    """The address text names (surrounding blanks ignored), or None when it names none."""
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`, how a dual-stack socket shows an IPv4
    peer) as the IPv4 address it is; any other address as is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_within(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """Whether any of the networks holds the address, IPv4-mapped addresses as IPv4."""
    address = unmapped(address)
    return any(address in network for network in networks)
