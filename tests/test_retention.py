"""Retention: old attempts go, rollups stay longer, fold marks go too."""

import io
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from delivery import retention
from delivery.models import AcceptedRollup, DeliveryAttempt, DeliveryRollup, DeliverySeries, RollupFold, Span
from delivery.recording import save_attempts
from delivery.rollups import add_accepted
from tests.test_dashboard import attempt

pytestmark = pytest.mark.django_db


def prune(*args: str) -> str:
    out = io.StringIO()
    call_command("prunehistory", *args, stdout=out)
    return out.getvalue()


def test_attempts_go_after_their_days_and_rollups_stay_longer(monkeypatch):
    monkeypatch.setattr(retention, "BATCH", 2)  # several batches
    now = timezone.now()
    old, older, oldest = now - timedelta(days=31), now - timedelta(days=40), now - timedelta(days=500)
    save_attempts([attempt(when, postback=f"p{n}") for n, when in enumerate([now, old, old, older, oldest])])
    add_accepted({oldest.replace(second=0, microsecond=0): 3, now.replace(second=0, microsecond=0): 1})
    mark = RollupFold.objects.create(token="old")
    RollupFold.objects.filter(pk=mark.pk).update(folded_at=now - timedelta(days=8))
    RollupFold.objects.create(token="new")

    printed = prune()

    assert "deleted 4 attempts" in printed
    assert list(DeliveryAttempt.objects.values_list("postback_id", flat=True)) == ["p0"]
    # Minute rollups: kept 35 days (the one of 31 days stays); hourly ones 400 days.
    assert DeliveryRollup.objects.filter(minute__lt=now - timedelta(days=35)).count() == 0
    assert DeliveryRollup.objects.filter(minute__lt=now - timedelta(days=30)).exists()
    assert DeliverySeries.objects.filter(span=Span.HOUR, start__lt=now - timedelta(days=35)).exists()
    assert not DeliverySeries.objects.filter(start__lt=now - timedelta(days=400)).exists()
    assert AcceptedRollup.objects.count() == 1
    assert list(RollupFold.objects.values_list("token", flat=True)) == ["new"]


def test_a_dry_run_counts_and_deletes_nothing():
    save_attempts([attempt(datetime(2020, 1, 1, tzinfo=UTC))])
    assert "would delete 1 attempts" in prune("--dry-run")
    assert DeliveryAttempt.objects.count() == 1
    assert "deleted 1 attempts" in prune("--attempt-days", "1")
