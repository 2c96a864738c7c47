"""`manage.py seedhistory`: realistic history whose rollups add up to its attempts."""

import io
from datetime import UTC, datetime

import pytest
from django.core.management import call_command
from django.db.models import Count, Sum

from delivery import seeding
from delivery.models import ALL_HOSTS, AcceptedRollup, DeliveryAttempt, DeliverySeries, Span
from tests.test_rollups import attempt_counts, rollup_counts

pytestmark = pytest.mark.django_db


def test_it_writes_the_attempts_asked_for_with_rollups_that_add_up(monkeypatch):
    monkeypatch.setattr(seeding, "CHUNK", 700)  # several chunks, each its own transaction
    out = io.StringIO()
    call_command("seedhistory", "--attempts", "3000", "--days", "2", "--hosts", "12", "--seed", "7", stdout=out)

    assert "3000 attempt rows written" in out.getvalue()
    assert DeliveryAttempt.objects.count() == 3000
    assert rollup_counts() == attempt_counts()
    for span in Span:
        summed = DeliverySeries.objects.filter(span=span, host=ALL_HOSTS).aggregate(n=Sum("attempts"))["n"]
        assert summed == 3000
    first_tries = DeliveryAttempt.objects.filter(attempt=1).values("postback_id").distinct().count()
    assert AcceptedRollup.objects.aggregate(n=Sum("postbacks"))["n"] == first_tries


def test_the_history_looks_like_real_traffic():
    end = datetime(2026, 11, 29, 12, tzinfo=UTC)
    seeding.seed(6000, days=3, hosts=20, end=end, seed_value=3)

    outcomes = dict(DeliveryAttempt.objects.values_list("outcome").annotate(n=Count("id")))
    assert outcomes["success"] > 0.8 * 6000
    assert {"retry", "failed", "deferred"} <= set(outcomes)
    busiest = DeliveryAttempt.objects.values("host").annotate(n=Count("id")).order_by("-n")
    assert busiest[0]["n"] > 5 * busiest[len(busiest) - 1]["n"]  # a few hosts carry most of it
    assert DeliveryAttempt.objects.filter(delivered_at__gte=end).count() == 0
    retried = DeliveryAttempt.objects.filter(attempt=2).first()
    assert retried is not None
    assert DeliveryAttempt.objects.get(postback_id=retried.postback_id, attempt=1, outcome="retry")
