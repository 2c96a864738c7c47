"""`manage.py queryplans`: the index each page's query over the attempt log and its rollups
uses, and how long the page takes, over the data at hand (PostgreSQL or SQLite).

Each page (dashboard endpoints, the postback page, the admin attempt list and its filters, the
replay form, `prunehistory --dry-run`, a worker's look at the log before sending) is called in
process, as `dashboardtimings` does, its queries captured, and each query on the attempt or
rollup tables explained (EXPLAIN ANALYZE on PostgreSQL, EXPLAIN QUERY PLAN on SQLite). A query
that reads one of those tables whole (a sequential scan, SQLite's SCAN) is marked: with a
large log, that page would be slow. Reads only; the page calls are timed before any EXPLAIN.
"""

import json
import re
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from django.contrib import admin
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandParser
from django.db import connection
from django.db.models import Count, Max
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from dashboard import views
from dashboard.management.commands.dashboardtimings import ENDPOINTS
from dashboard.ranges import PRESETS, preset
from delivery import partitions
from delivery.admin import DeliveryAttemptAdmin
from delivery.models import AcceptedRollup, DeliveryAttempt, DeliveryRollup, DeliverySeries, Outcome
from delivery.progress import recorded_tries
from delivery.retention import Retention, prune

# The tables whose indexes this command is about.
TABLES = tuple(model._meta.db_table for model in (DeliveryAttempt, DeliveryRollup, DeliverySeries, AcceptedRollup))
Page = Callable[[], object]


class Command(BaseCommand):
    help = "Explain each page's queries over the attempt log and rollups: the indexes used, and the page's time."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=int, default=3, help="timed calls per page (default 3)")

    def handle(self, *args: Any, **options: Any) -> None:
        self.user = User(username="plans", is_active=True, is_staff=True, is_superuser=True)
        self.factory = RequestFactory()
        self.stdout.write(f"{DeliveryAttempt.objects.count():,} attempt rows ({connection.vendor})")
        whole_scans = 0
        for label, page in self.pages():
            times, queries = self._time(page, options["runs"])
            self.stdout.write(f"{label}: median {statistics.median(times):.1f} ms, max {max(times):.1f} ms")
            for sql in queries:
                scans, indexes, ms = explain(sql)
                whole_scans += len(scans)
                where = ", ".join(indexes) or "no index"
                marks = "".join(f"  READS {table} WHOLE" for table in scans)
                took = f" {ms:.1f} ms" if ms is not None else ""
                self.stdout.write(f"    {where}{took}{marks}  <- {sql[:110]}")
        self.stdout.write(f"queries reading a table whole: {whole_scans}")

    def pages(self) -> Iterator[tuple[str, Page]]:
        """Each page, as staff would open it over this log: its newest week, its busiest host,
        its newest failed postback."""
        newest = DeliveryAttempt.objects.aggregate(newest=Max("delivered_at"))["newest"] or timezone.now()
        busiest = DeliveryAttempt.objects.values("host").annotate(n=Count("id")).order_by("-n").first()
        host = busiest["host"] if busiest else "none.example"
        latest = DeliveryAttempt.objects.order_by("-delivered_at")
        example = latest.filter(outcome=Outcome.FAILED).first() or latest.first() or DeliveryAttempt()
        yield from self._dashboard_pages(newest, host, example.postback_id)
        yield from self._admin_pages(newest, host, example.postback_id)
        yield "prunehistory --dry-run", lambda: prune(Retention.configured(), now=newest, dry_run=True)
        recent = list(latest.values_list("postback_id", flat=True)[:500])
        yield "worker: tries recorded for 500 postbacks", lambda: recorded_tries(recent)

    def _dashboard_pages(self, newest: datetime, host: str, postback_id: str) -> Iterator[tuple[str, Page]]:
        for name in ["24h", "7d"]:
            window = preset(name, *PRESETS[name], newest)
            query = {"range": "custom", "start": window.start.isoformat(), "end": window.end.isoformat()}
            for endpoint, view in ENDPOINTS.items():
                if endpoint != "live":  # Redis only
                    yield f"dashboard {endpoint} {name}", self._get(view, query)
                    yield f"dashboard {endpoint} {name} one host", self._get(view, {**query, "host": host})
        if postback_id:
            yield "dashboard postback page", lambda: views.postback(self._request({}), postback_id)

    def _admin_pages(self, newest: datetime, host: str, postback_id: str) -> Iterator[tuple[str, Page]]:
        attempts_admin = admin.site._registry[DeliveryAttempt]
        assert isinstance(attempts_admin, DeliveryAttemptAdmin)
        since = (newest - timedelta(days=7)).isoformat()
        for label, query in [
            ("admin attempt list", {}),
            ("admin attempt list, failed", {"outcome__exact": "failed"}),
            ("admin attempt list, 5xx", {"status": "5xx"}),
            ("admin attempt list, past 7 days", {"delivered_at__gte": since}),
            ("admin attempt list, one postback", {"q": postback_id}),
            ("admin attempt list, one host", {"q": host}),
            ("admin attempt list, one host failed", {"q": host, "outcome__exact": "failed"}),
        ]:
            yield label, self._get(attempts_admin.changelist_view, query)
        yield "admin replay form", self._get(attempts_admin.replay_view, {"since": since})
        yield "admin replay form, one host", self._get(attempts_admin.replay_view, {"since": since, "host": host})

    def _request(self, query: dict[str, str]) -> HttpRequest:
        request = self.factory.get("/", query)
        request.user = self.user
        return request

    def _get(self, view: Callable[[HttpRequest], HttpResponse], query: dict[str, str]) -> Page:
        def call() -> HttpResponse:
            response = view(self._request(query))
            if isinstance(response, TemplateResponse):
                response.render()
            return response

        return call

    @staticmethod
    def _time(page: Page, runs: int) -> tuple[list[float], list[str]]:
        """The queries the page makes on the tables (in a first call, which also warms caches
        and connections), then its times in ms, with nothing captured."""
        with CaptureQueriesContext(connection) as captured:
            page()
        selects = [query["sql"] for query in captured if query["sql"].lstrip().upper().startswith("SELECT")]
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            page()
            times.append((time.perf_counter() - started) * 1000)
        return times, [sql for sql in selects if any(f'"{table}"' in sql for table in TABLES)]


def explain(sql: str) -> tuple[list[str], list[str], float | None]:
    """The tables the query reads whole, the indexes it uses, and its time (ms, PostgreSQL)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
            raw = cursor.fetchone()[0]
            [plan] = json.loads(raw) if isinstance(raw, str) else raw
            nodes = list(_nodes(plan["Plan"]))
            parents = _partition_parents()
            scans = [node["Relation Name"] for node in nodes if node["Node Type"] == "Seq Scan"]
            scans = [parents.get(name, name) for name in scans]
            indexes = [parents.get(node["Index Name"], node["Index Name"]) for node in nodes if "Index Name" in node]
            return _tables(scans), sorted(set(indexes)), plan["Execution Time"]
        cursor.execute(f"EXPLAIN QUERY PLAN {sql}")
        details = [row[-1] for row in cursor.fetchall()]
    scans = [match[1] for line in details if (match := re.match(r"SCAN (\w+)(?! USING)", line))]
    indexes = [match[1] for line in details if (match := re.search(r"USING (?:COVERING )?INDEX (\w+)", line))]
    return _tables(scans), sorted(set(indexes)), None


def _partition_parents() -> dict[str, str]:
    """PostgreSQL's names for what plans read, by the names the model gives them: a table for
    each of its day partitions that holds rows, an index for each partition's copy of it.
    Empty partitions (the days ahead) and the DEFAULT partition (empty unless something went
    wrong) keep their own names: the planner reads an empty table whole, at no cost."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT child.relname, root.relname FROM pg_class child "
            "JOIN pg_class root ON root.oid = pg_partition_root(child.oid) "
            "WHERE child.relispartition AND (child.relkind <> 'r' OR child.relpages > 0)"
        )
        parents = dict(cursor.fetchall())
    parents[partitions.DEFAULT] = partitions.DEFAULT
    return parents


def _tables(names: list[str]) -> list[str]:
    return [name for name in names if name in TABLES]


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)
