"""Which addresses delivery may connect to: public unicast ones, and any inside
DELIVERY_ALLOW_NETWORKS. The transport asks for each socket libcurl opens, after resolution.

Two things make "public" harder than `ipaddress`'s `is_global`:
- IPv6 has forms that carry an IPv4 address, and a host or a gateway on the way may deliver
  to that IPv4 address: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, SIIT's
  `::ffff:0:a.b.c.d`, NAT64's `64:ff9b::a.b.c.d`, 6to4's `2002:aabb:ccdd::` (bits 16-48).
  Each is judged by the IPv4 address it carries: `64:ff9b::127.0.0.1` is loopback to a NAT64
  gateway. Forms whose IPv4 address cannot be read for sure are refused: NAT64's local-use
  `64:ff9b:1::/48` (where the address sits depends on the operator's prefix length) and Teredo
  `2001::/32` (inside 2001::/23, below).
- `is_global` depends on the Python release: 3.11.7 calls 192.0.0.8, `fec0::1` and all of the
  forms above global. So the IANA special-purpose registries are listed here, and an address
  must pass both this list and `is_global`.
"""

import ipaddress
from collections.abc import Iterable

from postbackproject.addresses import IPAddress, IPNetwork, is_within, parse_networks

# IANA IPv4 Special-Purpose Address Registry, with the blocks it calls globally reachable that
# only routing infrastructure uses (AS112, AMT, 6to4 relays): no receiver lives there.
NOT_PUBLIC_IPV4 = parse_networks(
    [
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments: DS-Lite, NAT64 discovery (192.0.0.8, .170)...
        "192.0.2.0/24",  # documentation
        "192.31.196.0/24",  # AS112
        "192.52.193.0/24",  # AMT
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "192.175.48.0/24",  # AS112 direct delegation
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
    ]
)
# Global unicast IPv6 is 2000::/3; outside it only the IPv4-carrying forms (judged by their
# IPv4 address) may be reached. Inside it, the IANA IPv6 Special-Purpose Address Registry's
# blocks that are not ordinary hosts.
IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
NOT_PUBLIC_IPV6 = parse_networks(
    [
        "2001::/23",  # IETF protocol assignments: Teredo (2001::/32), benchmarking, ORCHID...
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
    ]
)
# IPv6 prefixes whose last 32 bits are an IPv4 address: IPv4-compatible (`::/96`, deprecated,
# `::1` among them), IPv4-mapped, SIIT's IPv4-translated, NAT64's well-known prefix.
IPV4_IN_LAST_32_BITS = parse_networks(["::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"])
SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # the IPv4 address is bits 16 to 48


def is_allowed_address(address: IPAddress, allowed: Iterable[IPNetwork]) -> bool:
    """Public unicast addresses are allowed; anything else only inside an allowed network.

    An IPv6 address that carries an IPv4 address is public only if that IPv4 address is. The
    allowed networks are matched against the address connected to (IPv4-mapped ones as the
    IPv4 address they are, which the kernel connects to): `127.0.0.0/8` opens
    `::ffff:127.0.0.1`, not `64:ff9b::127.0.0.1`, which a NAT64 gateway would take to its own
    loopback. An operator who means that lists the IPv6 network itself."""
    if is_within(address, allowed):
        return True
    carried = embedded_ipv4(address)
    return is_public(carried if carried is not None else address)


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (see the module's docstring), or None."""
    if address.version != 6:
        return None
    if any(address in prefix for prefix in IPV4_IN_LAST_32_BITS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Global unicast by the IANA registries and by `ipaddress` both (IPv4-carrying forms are
    not public: embedded_ipv4 judges them)."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return not any(address in network for network in NOT_PUBLIC_IPV4)
    if address not in IPV6_GLOBAL_UNICAST or address in SIX_TO_FOUR:
        return False
    return not any(address in network for network in NOT_PUBLIC_IPV6)


def refusal(address: IPAddress) -> str:
    """Why the address is refused, for the attempt's error."""
    reason = f"destination address {address} is not public and not in DELIVERY_ALLOW_NETWORKS"
    carried = embedded_ipv4(address)
    return f"{reason} (it carries the IPv4 address {carried})" if carried is not None else reason
