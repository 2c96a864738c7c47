"""`manage.py dashboardtimings` runs every endpoint over the data at hand (it asserts no time)."""

import io
from datetime import UTC, datetime

import pytest
from django.core.management import call_command

from delivery.recording import save_attempts
from tests.test_dashboard import attempt

pytestmark = pytest.mark.django_db


def test_it_times_every_endpoint_for_every_range():
    save_attempts([attempt(datetime(2026, 11, 29, 10, 0, tzinfo=UTC), code=503, outcome="retry")])
    out = io.StringIO()
    call_command("dashboardtimings", "--runs", "1", stdout=out)
    printed = out.getvalue()
    for line in ["volume     1h ", "failures   7d host=a.example", "hosts      30d custom", "live       1h "]:
        assert line in printed
    assert "slowest call:" in printed
