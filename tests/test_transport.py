"""Transport pieces that need no receiver: the address guard and Retry-After parsing."""

import ipaddress
from datetime import UTC, datetime

import pytest

from delivery.transport import is_allowed_address, parse_retry_after

ALLOW_LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address):
    assert not is_allowed_address(ipaddress.ip_address(address), [])


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"])
def test_public_addresses_are_allowed(address):
    assert is_allowed_address(ipaddress.ip_address(address), [])


def test_allowed_networks_open_private_ranges_they_cover_only():
    assert is_allowed_address(ipaddress.ip_address("127.0.0.5"), ALLOW_LOOPBACK)
    assert is_allowed_address(ipaddress.ip_address("::ffff:127.0.0.1"), ALLOW_LOOPBACK)
    assert not is_allowed_address(ipaddress.ip_address("10.0.0.1"), ALLOW_LOOPBACK)


NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Sun, 29 Nov 2026 12:01:30 GMT", 90.0),
        ("Sun, 29 Nov 2026 11:00:00 GMT", 0.0),
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_takes_seconds_or_a_date(header, seconds):
    assert parse_retry_after(header, NOW) == seconds
