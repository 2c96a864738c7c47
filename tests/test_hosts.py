"""Destination hosts and their earned limits: pure logic, no Redis, no receiver."""

import math

import pytest

from delivery.hosts import (
    EARNING_SECONDS,
    INITIAL_IN_FLIGHT,
    InFlightLimit,
    RememberedLimits,
    host_of,
    unproven_slots,
)


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://Example.COM/path", "example.com"),
        ("http://example.com:80/x", "example.com"),
        ("https://example.com:443/x", "example.com"),
        ("https://example.com:8443/x", "example.com:8443"),
        ("http://example.com:443/x", "example.com:443"),
        ("http://user:secret@example.com/x", "example.com"),
        ("http://[2001:db8::1]:8080/x?y=1", "[2001:db8::1]:8080"),
        ("http://example.com?q=a/b", "example.com"),
        ("http://example.com#frag", "example.com"),
    ],
)
def test_a_host_is_its_lower_case_authority_without_user_info_or_default_port(url, host):
    assert host_of(url) == host


@pytest.mark.parametrize(
    ("concurrency", "slots"),
    [(1, 1), (4, 4), (16, 16), (32, 16), (64, 16), (1024, 256), (2000, 500)],
)
def test_unproven_hosts_share_a_quarter_of_the_slots_and_room_for_two_hosts_at_least(concurrency, slots):
    assert unproven_slots(concurrency) == slots


def test_a_new_host_has_no_limit_of_its_own_until_it_answers():
    limit = InFlightLimit()

    assert not limit.proven
    assert limit.allows(5000, cap=10_000)
    assert not limit.allows(10_000, cap=10_000)


def test_the_first_answer_proves_the_host_with_what_it_had_in_flight():
    limit = InFlightLimit()

    assert limit.answered(in_flight=199, cap=1000, seconds=1.0)

    assert limit.proven
    assert limit.limit == 201  # the 200 it had out, and one earned
    assert limit.allows(200, cap=1000)
    assert not limit.allows(201, cap=1000)


def test_a_first_answer_with_little_in_flight_still_earns_the_initial_limit():
    limit = InFlightLimit()
    limit.answered(in_flight=0, cap=1000, seconds=0.01)

    assert limit.limit == INITIAL_IN_FLIGHT + 1


def test_quick_answers_earn_one_each_and_slow_ones_one_per_tenth_of_a_second():
    quick, slow = InFlightLimit(), InFlightLimit()
    for limit in (quick, slow):
        limit.answered(in_flight=9, cap=10_000, seconds=0.0)  # proven at 11

    quick.answered(in_flight=10, cap=10_000, seconds=0.02)
    slow.answered(in_flight=10, cap=10_000, seconds=1.0)

    assert quick.limit == 12
    assert slow.limit == 11 + 1.0 / EARNING_SECONDS


def test_earnings_stop_at_the_cap():
    limit = InFlightLimit()
    limit.answered(in_flight=50, cap=60, seconds=0.0)
    for _ in range(20):
        limit.answered(in_flight=50, cap=60, seconds=1.0)

    assert limit.limit == 60


def test_silence_halves_the_limit_and_takes_the_proof_away():
    limit = InFlightLimit()
    limit.answered(in_flight=99, cap=1000, seconds=0.0)  # 101

    assert limit.went_silent(in_flight=99)

    assert not limit.proven
    assert limit.limit == 50  # half of the 100 it had out
    assert not limit.went_silent(in_flight=10)  # already unproven
    assert limit.limit == 5.5


def test_silence_never_takes_a_host_below_one_request():
    limit = InFlightLimit()
    for _ in range(30):
        limit.went_silent(in_flight=0)

    assert limit.limit == 1
    assert limit.allows(0, cap=10)
    assert not limit.allows(1, cap=10)


def test_a_host_that_never_answered_halves_what_it_had_out_when_it_goes_silent():
    limit = InFlightLimit()
    assert limit.limit == math.inf

    limit.went_silent(in_flight=7)

    assert limit.limit == 4


def test_remembered_limits_come_back_and_the_least_recently_used_are_forgotten():
    remembered = RememberedLimits(size=2)
    first, second, third = InFlightLimit(), InFlightLimit(), InFlightLimit()
    first.answered(0, 100, 0.0)
    remembered.keep("a", first)
    remembered.keep("b", second)
    remembered.keep("c", third)

    assert remembered.take("a") is not first  # forgotten: a fresh limit
    assert remembered.take("b") is second
    assert remembered.take("c") is third
    assert remembered.take("c") is not third  # taken means the caller holds it now
