"""`manage.py requestcosts`: its cases are what ingestion accepts, and it counts what it says
(nothing here asserts how fast anything is)."""

import pytest

from benchmark.request_costs import CASES, StorageCase, rendering_cost, storage_cost
from delivery.models import DeliveryAttempt

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def clean_redis() -> None:
    """No Redis needed: the suite's own is not started for these tests."""


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_rendering_case_is_a_request_ingestion_accepts_and_every_try_is_made(case):
    cost = rendering_cost(case)  # InvalidRequest if the door would refuse it

    assert cost.objects > 0 and cost.rendered_bytes > cost.objects


def test_storage_counts_the_rows_it_wrote_and_leaves_none_behind():
    case = StorageCase("small", postbacks=50, url_bytes=600, body_bytes=300, reply_bytes=100, host_per_postback=True)

    cost = storage_cost(case)

    assert cost.rendered_bytes == 50 * 900
    assert cost.database_bytes >= cost.rendered_bytes
    assert cost.log_bytes > 50 * (600 + 100)  # the URL and the reply, not the body
    assert not DeliveryAttempt.objects.exists()
