"""Every index kept on the attempt log and its rollups serves a page: `manage.py queryplans`
explains each page's queries and names the indexes they use."""

import io
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db import connection

from delivery.models import DeliveryAttempt, DeliveryRollup, DeliverySeries
from delivery.recording import save_attempts
from tests.test_dashboard import attempt

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)


def plans() -> str:
    """The command's report over a small log, with the planner told to use an index wherever
    one can serve (on a few rows PostgreSQL would rather read the table)."""
    rows = [
        attempt(NOW - timedelta(minutes=7 * n), host=f"h{n % 3}.example", code=code, outcome=outcome)
        for n, (code, outcome) in enumerate([(200, "success"), (503, "retry"), (404, "failed")] * 20)
    ]
    save_attempts(rows)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET enable_seqscan = off")
    out = io.StringIO()
    call_command("queryplans", "--runs", "1", stdout=out)
    return out.getvalue()


def declared_indexes() -> set[str]:
    models = [DeliveryAttempt, DeliveryRollup, DeliverySeries]
    return {index.name for model in models for index in model._meta.indexes if index.name}


def test_every_declared_index_of_the_log_and_its_rollups_serves_a_page():
    if connection.vendor == "postgresql":
        # Between two indexes that both serve a query, PostgreSQL's choice on a few rows is
        # not the one it makes on millions: docs/performance.md has its plans at 1,000,000.
        pytest.skip("PostgreSQL chooses among indexes by the size of the data")
    report = plans()

    used = {
        name
        for line in report.splitlines()
        if line.startswith("    ")
        for name in re.findall(r"\w+", line.split("<-")[0])
    }
    assert declared_indexes() <= used, report


def test_the_report_names_each_page_its_time_and_the_index_of_each_query():
    report = plans()

    assert report.startswith("60 attempt rows")
    pages = re.findall(r"^(\S.*): median [\d.]+ ms, max [\d.]+ ms\n((?:    .*\n)*)", report, re.M)
    names = [name for name, _ in pages]
    assert {"admin attempt list", "admin replay form", "dashboard postback page", "prunehistory --dry-run"} <= set(
        names
    )
    assert all("no index" not in queries for _, queries in pages), report
    assert report.endswith("queries reading a table whole: 0\n")
