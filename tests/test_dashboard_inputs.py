"""The dashboard's inputs, fuzzed: every page and JSON endpoint, each query parameter given odd
values (slashes, NUL, very long, offsets no clock has, unknown ranges, non-numbers), answers
2xx or 4xx, never 5xx; an input it cannot use is a 400 that says why."""

from urllib.parse import quote

import pytest
from django.contrib.auth.models import User
from django.test import Client

from dashboard.views import MAX_HOST_CHARS

pytestmark = pytest.mark.django_db

ODD_VALUES = [
    "",
    " ",
    "a/b",
    "../../etc/passwd",
    "\x00",
    "a\x00b",
    "x" * 10_000,
    "%",
    "%00",
    "ü\u202e",
    "-1",
    "1e309",
    "NaN",
    "24h\x00",
    "7D",
    "2y",
    "custom",
    "2026-01-01T00:00+99:00",
    "2026-01-01T00:00-24:00",
    "2026-13-45T25:61",
    "0001-01-01T00:00",
    "0001-01-01T00:00+14:00",
    "9999-12-31T23:59",
    "9999-12-31T23:59-14:00",
    "2026-01-01T00:00Z",
    "2026-01-01",
    "1764547200",
]
# The parameters each JSON endpoint reads; `range=custom` with an odd `start` or `end` too.
API = ["volume", "success", "latency", "codes", "hosts", "failures", "live"]
PARAMETERS = ["range", "start", "end", "host"]


@pytest.fixture
def analyst() -> Client:
    """A signed-in client that answers a view's exception with a 500, as the server does."""
    client = Client(raise_request_exception=False)
    client.force_login(User.objects.create_user("analyst", password="a-long-test-password"))
    return client


def server_errors(client: Client, path: str, queries: list[dict[str, str]]) -> list[tuple[dict[str, str], int]]:
    answers = [(query, client.get(path, query).status_code) for query in queries]
    return [(query, status) for query, status in answers if status >= 500]


def odd_queries() -> list[dict[str, str]]:
    queries = [{name: value} for name in PARAMETERS for value in ODD_VALUES]
    queries += [{"range": "custom", "start": value, "end": "2026-01-02T00:00"} for value in ODD_VALUES]
    queries += [{"range": "custom", "start": "2026-01-01T00:00", "end": value} for value in ODD_VALUES]
    queries += [{"range": "custom", "start": value, "end": value} for value in ODD_VALUES]
    return queries


@pytest.mark.parametrize("name", API)
def test_no_odd_query_makes_an_endpoint_fail(analyst, name):
    assert server_errors(analyst, f"/dashboard/api/{name}", odd_queries()) == []


def test_no_odd_query_makes_the_overview_fail(analyst):
    assert server_errors(analyst, "/dashboard/", odd_queries()) == []


def test_no_odd_id_makes_the_postback_lookup_or_page_fail(analyst):
    assert server_errors(analyst, "/dashboard/postbacks/", [{"id": value} for value in ODD_VALUES]) == []
    paths = [f"/dashboard/postbacks/{quote(value, safe='')}/" for value in ODD_VALUES if value.strip()]
    assert [(path, status) for path in paths if (status := analyst.get(path).status_code) >= 500] == []


def test_an_id_no_postback_can_have_is_a_400_that_says_why(analyst):
    response = analyst.get("/dashboard/postbacks/", {"id": "a/b"})
    assert response.status_code == 400
    assert "a postback id" in response.content.decode()


def test_an_offset_no_clock_has_is_a_400_that_says_why(analyst):
    query = {"range": "custom", "start": "2026-01-01T00:00+99:00", "end": "2026-01-02T00:00"}
    response = analyst.get("/dashboard/api/volume", query)
    assert response.status_code == 400
    assert "start" in response.json()["error"]


@pytest.mark.parametrize("host", ["a\x00b", "h" * (MAX_HOST_CHARS + 1)], ids=["NUL", "too long"])
def test_a_host_no_attempt_can_have_is_a_400_that_says_why(analyst, host):
    for name in ["volume", "failures", "hosts"]:
        response = analyst.get(f"/dashboard/api/{name}", {"range": "1h", "host": host})
        assert response.status_code == 400
        assert "host" in response.json()["error"]


def test_a_query_string_that_is_not_utf8_is_answered(analyst):
    for path in ["/dashboard/api/volume?host=%FF", "/dashboard/api/volume?range=%FF", "/dashboard/postbacks/?id=%FF"]:
        assert analyst.get(path).status_code < 500
