"""Dashboards for analysts: read-only views over the attempt log, behind a login."""

from datetime import timedelta

from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from delivery.models import DeliveryAttempt, Outcome


@login_required
def index(request: HttpRequest) -> HttpResponse:
    """Attempts of the last 24 hours by outcome (one grouped query)."""
    since = timezone.now() - timedelta(hours=24)
    counts = dict(DeliveryAttempt.objects.filter(delivered_at__gte=since).values_list("outcome").annotate(Count("id")))
    rows = [(outcome.label, counts.get(outcome.value, 0)) for outcome in Outcome]
    return render(request, "dashboard/index.html", {"rows": rows, "since": since})
