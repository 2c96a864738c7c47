"""One way to write a time (14:30:05) and one to write a date-time (2026-12-04 14:30:05), in
TIME_ZONE, on every page: the dashboard's chart labels, a postback's page, admin's lists and
forms, the open circuits. The browser test checks what the dashboard's script writes."""

import re
import time
from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import User
from django.utils import formats

from delivery.models import DeliveryAttempt
from postbackproject import keys
from postbackproject.queue import get_connection

pytestmark = pytest.mark.django_db

# 2026-12-04 14:30:05 in Paris.
STARTED = datetime(2026, 12, 4, 13, 30, 5, tzinfo=UTC)
OTHER_WAYS = re.compile(r"\b(?:a\.m\.|p\.m\.|AM|PM)\b|Dec\.? 4|2:30|14:30(?!:05)|14:30:05 ?(?:UTC|CET|\+01)")


@pytest.fixture(autouse=True)
def paris(settings):
    settings.TIME_ZONE = "Europe/Paris"  # not UTC: a time shown in UTC would be caught


@pytest.fixture
def staff(client):
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "a-long-test-password"))
    return client


@pytest.fixture
def attempt() -> DeliveryAttempt:
    return DeliveryAttempt.objects.create(
        postback_id="p-1",
        attempt=1,
        host="a.example",
        delivered_at=STARTED,
        response_code=200,
        response_body="recorded",
        outcome="success",
    )


def page(client, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 200
    return str(response.content.decode())


def shown(html: str) -> str:
    """The page's text, without its markup (a <time datetime="..."> is for machines)."""
    return re.sub(r"<[^>]*>", " ", html)


def test_django_writes_times_and_date_times_one_way():
    assert formats.date_format(STARTED, "TIME_FORMAT") == "13:30:05"
    assert formats.date_format(STARTED, "DATETIME_FORMAT") == "2026-12-04 13:30:05"
    assert formats.date_format(STARTED, "SHORT_DATETIME_FORMAT") == "2026-12-04 13:30:05"
    assert formats.date_format(STARTED, "DATE_FORMAT") == "2026-12-04"
    assert formats.localize(STARTED) == "2026-12-04 13:30:05"


def test_a_postbacks_page_writes_its_date_times_in_the_time_zone(staff, attempt):
    text = page(staff, "/dashboard/postbacks/p-1/")
    assert "2026-12-04 14:30:05</time>" in text
    assert "Times in Europe/Paris." in text
    assert not OTHER_WAYS.search(shown(text))


@pytest.mark.parametrize(
    "path",
    ["/admin/delivery/deliveryattempt/", "/admin/delivery/deliveryattempt/{pk}/change/"],
    ids=["the attempt list", "an attempt's page"],
)
def test_admin_writes_an_attempts_date_time_one_way(staff, attempt, path):
    text = page(staff, path.format(pk=attempt.pk))
    assert "2026-12-04 14:30:05" in text
    assert not OTHER_WAYS.search(shown(text))


def test_the_open_circuits_page_writes_when_each_closes_in_the_time_zone(staff):
    get_connection().zadd(keys.CIRCUITS_OPEN, {"down.example": (time.time() + 600) * 1000})
    text = page(staff, "/admin/delivery/circuitbreaker/")
    assert "Open until (Europe/Paris)" in text
    assert re.search(r"<td[^>]*>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}</td>", text)
    assert not OTHER_WAYS.search(shown(text))


@pytest.mark.parametrize(
    ("start", "end", "first_label"),
    [
        ("2026-12-04T14:00", "2026-12-04T15:00", "14:00:00"),  # a day or less: times
        ("2026-12-01T14:00", "2026-12-05T14:00", "2026-12-01 14:00:00"),  # days, by the hour: date-times
        ("2026-11-01T00:00", "2026-12-01T00:00", "2026-11-01"),  # day buckets: dates
    ],
)
def test_chart_labels_are_written_as_pages_write_times(staff, settings, start, end, first_label):
    settings.MINUTE_ROLLUP_RETENTION_DAYS = 100_000  # the fixed dates stay drawn by the minute
    response = staff.get("/dashboard/api/volume", {"range": "custom", "start": start, "end": end})
    assert response.status_code == 200
    assert response.json()["labels"][0] == first_label
