"""What a response means for a postback, and how long it waits: pure functions, no Redis, no
database (the settings are an unsaved row)."""

import random
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from delivery.models import DeliverySettings, Outcome
from delivery.policy import backoff_seconds, host_answered, outcome_of, retry_delay_seconds
from delivery.transport import Response

CONFIG = DeliverySettings(max_attempts=5, backoff_base_seconds=10, backoff_factor=4, backoff_max_seconds=3600)


@pytest.fixture(autouse=True)
def clean_redis() -> Iterator[None]:
    """These tests need no Redis: the suite's own is not started for them."""
    yield None


def answer(status: int) -> Response:
    return Response(datetime.now(UTC), status, 12.0)


def no_answer(transient: bool) -> Response:
    return Response(datetime.now(UTC), None, 12.0, error="timed out" if transient else "refused", transient=transient)


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_any_2xx_is_a_success_even_on_the_last_try(status):
    assert outcome_of(answer(status), 5, CONFIG) == Outcome.SUCCESS


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_statuses_that_say_not_now_are_retried_until_the_attempts_run_out(status):
    assert outcome_of(answer(status), 1, CONFIG) == Outcome.RETRY
    assert outcome_of(answer(status), 4, CONFIG) == Outcome.RETRY
    assert outcome_of(answer(status), 5, CONFIG) == Outcome.FAILED


@pytest.mark.parametrize("status", [100, 301, 302, 304, 400, 401, 403, 404, 410, 422, 600])
def test_other_statuses_fail_at_once_redirects_included(status):
    assert outcome_of(answer(status), 1, CONFIG) == Outcome.FAILED


def test_a_failure_without_an_answer_is_retried_only_when_it_may_go_away():
    assert outcome_of(no_answer(transient=True), 1, CONFIG) == Outcome.RETRY
    assert outcome_of(no_answer(transient=False), 1, CONFIG) == Outcome.FAILED


@given(
    try_in_series=st.integers(min_value=1, max_value=60),
    base=st.floats(min_value=0, max_value=86400),
    factor=st.floats(min_value=1, max_value=100),
    longest=st.floats(min_value=0, max_value=7 * 86400),
)
@example(try_in_series=9, base=5e-324, factor=1.125, longest=1.0)  # the halves' sum rounded past it
def test_backoff_waits_between_half_and_all_of_its_exponential_ceiling(try_in_series, base, factor, longest):
    config = DeliverySettings(backoff_base_seconds=base, backoff_factor=factor, backoff_max_seconds=longest)
    ceiling = min(longest, base * factor ** (try_in_series - 1))

    wait = backoff_seconds(try_in_series, config)

    assert ceiling / 2 <= wait <= ceiling


def test_backoff_jitter_spreads_waits_over_the_whole_upper_half():
    random.seed(7)
    waits = [backoff_seconds(2, CONFIG) for _ in range(2000)]  # ceiling 40 s

    assert 20 <= min(waits) < 21
    assert 39 < max(waits) <= 40
    assert len({round(wait) for wait in waits}) == 21  # every whole second from 20 to 40


def test_backoff_grows_by_its_factor_and_stops_at_the_longest_wait():
    random.seed(3)
    longest = [max(backoff_seconds(n, CONFIG) for _ in range(500)) for n in range(1, 8)]

    assert longest == pytest.approx([10, 40, 160, 640, 2560, 3600, 3600], rel=0.02)


@given(retry_after=st.floats(min_value=0, max_value=10**9, allow_nan=False))
def test_retry_after_lengthens_the_wait_never_beyond_the_longest_backoff(retry_after):
    delay = retry_delay_seconds(1, retry_after, CONFIG)  # backoff: 5 to 10 s

    assert 5 <= delay <= 3600
    assert delay >= min(retry_after, 3600)


def test_retry_after_shorter_than_the_backoff_does_not_shorten_it():
    random.seed(1)
    assert retry_delay_seconds(3, 1.0, CONFIG) >= 80  # backoff 80 to 160 s


def test_retry_after_past_the_longest_backoff_waits_the_longest_backoff():
    assert retry_delay_seconds(1, 86400.0, CONFIG) == 3600


def test_what_a_try_says_about_its_host_for_the_circuit():
    assert host_answered(answer(200)) is True
    assert host_answered(answer(404)) is True  # it answered: the postback is wrong, not the host
    assert host_answered(answer(503)) is False
    assert host_answered(answer(429)) is False
    assert host_answered(no_answer(transient=True)) is False
    assert host_answered(no_answer(transient=False)) is None  # e.g. refused before sending
