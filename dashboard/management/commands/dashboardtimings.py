"""`manage.py dashboardtimings`: how long each JSON endpoint takes over the data at hand.

Calls the views in process (no HTTP, no session written: the dashboard only reads), each
range a few times after one warm-up call, and prints the median and the slowest. Ranges are
those of the page's buttons, as of --now (default: the newest attempt), so a seeded history
measures the same whenever it is measured.
"""

import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count, Max
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from dashboard import views
from dashboard.ranges import PRESETS, custom, preset
from delivery.models import DeliveryAttempt

ENDPOINTS: dict[str, Callable[[HttpRequest], HttpResponse]] = {
    "volume": views.volume,
    "success": views.success,
    "latency": views.latency,
    "codes": views.codes,
    "hosts": views.hosts,
    "failures": views.failures,
    "live": views.live_figures,
}


class Command(BaseCommand):
    help = "Time every dashboard JSON endpoint for the last hour, 24 hours, 7 days and 30 days (and one host)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=int, default=5, help="timed calls per endpoint and range (default 5)")
        parser.add_argument("--now", help="measure as of this time (ISO 8601; default: the newest attempt)")

    def handle(self, *args: Any, **options: Any) -> None:
        now = self._now(options["now"])
        busiest = DeliveryAttempt.objects.values("host").annotate(n=Count("id")).order_by("-n").first()
        user = User(username="timing", is_active=True, is_staff=True)
        self.stdout.write(f"{DeliveryAttempt.objects.count():,} attempt rows; ranges as of {now.isoformat()}")
        self.stdout.write(f"{'endpoint':10} {'range':22} {'median ms':>10} {'max ms':>8}")
        slowest = 0.0
        # The page's buttons, and a custom month (drawn by local days).
        ranges = [(name, preset(name, length, bucket, now)) for name, (length, bucket) in PRESETS.items()]
        ranges.append(("30d custom", custom(now - timedelta(days=30), now)))
        for name, window in ranges:
            params = {"range": "custom", "start": window.start.isoformat(), "end": window.end.isoformat()}
            cases = [(name, params)]
            if busiest:
                cases.append((f"{name} host={busiest['host'][:12]}", {**params, "host": busiest["host"]}))
            for label, query in cases:
                for endpoint, view in ENDPOINTS.items():
                    if endpoint == "live" and label != "1h":
                        continue
                    times = self._time(view, query, user, options["runs"])
                    slowest = max(slowest, max(times))
                    self.stdout.write(f"{endpoint:10} {label:22} {statistics.median(times):10.1f} {max(times):8.1f}")
        self.stdout.write(f"slowest call: {slowest:.1f} ms")

    def _time(
        self, view: Callable[[HttpRequest], HttpResponse], query: dict[str, str], user: User, runs: int
    ) -> list[float]:
        factory = RequestFactory()
        times = []
        for run in range(runs + 1):
            request = factory.get("/dashboard/api/", query)
            request.user = user
            started = time.perf_counter()
            response = view(request)
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise CommandError(f"{view.__name__} answered {response.status_code}: {response.content[:200]!r}")
            if run:  # the first call warms caches and connections
                times.append(elapsed)
        return times

    @staticmethod
    def _now(text: str | None) -> datetime:
        if text:
            when = parse_datetime(text)
            if when is None or when.tzinfo is None:
                raise CommandError("--now is ISO 8601 with its zone")
            return when
        newest = DeliveryAttempt.objects.aggregate(newest=Max("delivered_at"))["newest"]
        return newest or timezone.now()
