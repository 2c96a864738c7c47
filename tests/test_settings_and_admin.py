"""Runtime delivery settings (command line and admin) and the admin's attempt log."""

import io
import re

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from delivery.admin import CappedPaginator
from delivery.models import DeliveryAttempt, DeliverySettings, PostbackRequest
from ingestion.models import SenderKey

pytestmark = pytest.mark.django_db


def run_command(*args: str) -> str:
    out = io.StringIO()
    call_command("deliverysettings", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def staff_client(client):
    user = User.objects.create_superuser("admin", "admin@example.com", "a-long-test-password")
    client.force_login(user)
    return client


def test_the_command_prints_the_defaults():
    printed = run_command()
    assert "max_attempts = 5" in printed
    assert "backoff_base_seconds = 10" in printed
    assert "backoff_factor = 4" in printed
    assert "backoff_max_seconds = 3600" in printed
    assert "unmatched_default = ''" in printed
    assert "store_response_body = 'failures'" in printed


def test_the_command_prints_whole_numbers_as_whole_numbers_and_keeps_decimals_otherwise():
    lines = run_command("--set", "backoff_max_seconds=3600", "--set", "connect_timeout_seconds=2.5").splitlines()

    assert "backoff_max_seconds = 3600" in lines
    assert "backoff_factor = 4" in lines
    assert "connect_timeout_seconds = 2.5" in lines
    assert "sign_postbacks = False" in lines


def test_the_settings_form_shows_whole_numbers_as_whole_numbers(staff_client):
    DeliverySettings(backoff_max_seconds=3600, connect_timeout_seconds=2.5).save()

    page = staff_client.get("/admin/delivery/deliverysettings/1/change/").content.decode()

    assert 'name="backoff_max_seconds" value="3600"' in page
    assert 'name="connect_timeout_seconds" value="2.5"' in page
    assert not re.search(r'value="[0-9]+\.0"', page)


def test_the_sender_key_list_shows_rate_limits_as_typed(staff_client):
    for name, rate in [("whole", 2.0), ("half", 0.5), ("default", None)]:
        sender = SenderKey(name=name, rate_limit=rate)
        sender.issue_key()
        sender.save()

    page = staff_client.get("/admin/ingestion/senderkey/").content.decode()
    cells = dict(re.findall(r'field-name">(whole|half|default)<.*?field-rate_limit_shown">([^<]*)<', page, re.S))

    assert cells == {"whole": "2", "half": "0.5", "default": "default"}
    edit = staff_client.get(f"/admin/ingestion/senderkey/{SenderKey.objects.get(name='whole').pk}/change/")
    assert 'name="rate_limit" value="2"' in edit.content.decode()


def test_the_command_changes_several_settings():
    printed = run_command("--set", "max_attempts=3", "--set", "unmatched_default= x ")
    assert "max_attempts = 3" in printed
    stored = DeliverySettings.load()
    assert (stored.max_attempts, stored.unmatched_default) == (3, " x ")


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("max_attempts=0", "max_attempts"),
        ("max_attempts=many", "max_attempts"),
        ("read_timeout_seconds=-1", "read_timeout_seconds"),
        ("colour=blue", "unknown setting"),
        ("max_attempts", "name=value"),
        ("unmatched_default=" + " " * 1001, "unmatched_default"),  # whitespace counts too
        ("store_response_body=some", "store_response_body"),
    ],
)
def test_the_command_refuses_invalid_values_and_changes_nothing(assignment, message):
    with pytest.raises(CommandError, match=message):
        run_command("--set", "batch_size=7", "--set", assignment)
    assert DeliverySettings.load().batch_size == 100


@pytest.mark.parametrize("policy", ["all", "failures", "none"])
def test_the_command_sets_which_attempts_keep_response_bodies(policy):
    printed = run_command("--set", f"store_response_body={policy}")

    assert f"store_response_body = '{policy}'" in printed.splitlines()
    assert DeliverySettings.load().store_response_body == policy


def test_current_settings_are_cached_for_the_configured_time(settings):
    settings.DELIVERY_SETTINGS_CACHE_SECONDS = 3600
    DeliverySettings().save()
    assert DeliverySettings.current().max_attempts == 5
    DeliverySettings.objects.filter(pk=1).update(max_attempts=9)  # an edit made by another process
    assert DeliverySettings.current().max_attempts == 5
    settings.DELIVERY_SETTINGS_CACHE_SECONDS = 0
    assert DeliverySettings.current().max_attempts == 9


@pytest.mark.parametrize("path", ["/admin/", "/admin/delivery/deliveryattempt/", "/dashboard/", "/admin/rq/"])
def test_admin_and_dashboards_need_a_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert "/login/" in response["Location"]


def test_the_settings_admin_opens_the_one_row_and_saves_with_validation(staff_client):
    response = staff_client.get("/admin/delivery/deliverysettings/")
    assert response.status_code == 302
    assert response["Location"].endswith("/admin/delivery/deliverysettings/1/change/")

    form = {
        "max_attempts": "0",
        "backoff_base_seconds": "10",
        "backoff_factor": "4",
        "backoff_max_seconds": "3600",
        "unmatched_default": "",
        "max_url_bytes": "16384",
        "connect_timeout_seconds": "5",
        "read_timeout_seconds": "10",
        "total_timeout_seconds": "15",
        "response_body_max_bytes": "4096",
        "store_response_body": "none",
        "batch_size": "100",
        "max_in_flight_per_host": "56",
        "circuit_failure_threshold": "5",
        "circuit_open_seconds": "30",
    }
    refused = staff_client.post("/admin/delivery/deliverysettings/1/change/", form)
    assert refused.status_code == 200
    assert "Ensure this value is greater than or equal to 1" in refused.content.decode()

    saved = staff_client.post("/admin/delivery/deliverysettings/1/change/", {**form, "max_attempts": "2"})
    assert saved.status_code == 302
    assert (DeliverySettings.load().max_attempts, DeliverySettings.load().store_response_body) == (2, "none")


def test_the_settings_admin_offers_each_response_body_policy(staff_client):
    page = staff_client.get("/admin/delivery/deliverysettings/", follow=True).content.decode()

    options = re.findall(
        r'<option value="(\w+)"( selected)?>', page.split('name="store_response_body"')[1].split("</select>")[0]
    )
    assert options == [("all", ""), ("failures", " selected"), ("none", "")]


def test_the_attempt_log_is_searchable_by_postback_id_and_filterable(staff_client):
    for pid, outcome in [("aaa", "success"), ("bbb", "failed")]:
        DeliveryAttempt.objects.create(
            postback_id=pid,
            attempt=1,
            delivered_at=timezone.now(),
            response_code=200 if outcome == "success" else 404,
            outcome=outcome,
        )
        PostbackRequest.objects.create(
            postback_id=pid, method="GET", url=f"http://example.com/{pid}", first_at=timezone.now()
        )

    found = staff_client.get("/admin/delivery/deliveryattempt/", {"q": "bbb"}).content.decode()
    assert "http://example.com/bbb" in found and "http://example.com/aaa" not in found
    filtered = staff_client.get("/admin/delivery/deliveryattempt/", {"outcome__exact": "success"}).content.decode()
    assert "http://example.com/aaa" in filtered and "http://example.com/bbb" not in filtered
    assert staff_client.get("/admin/delivery/deliveryattempt/add/").status_code == 403
    detail = staff_client.get(
        f"/admin/delivery/deliveryattempt/{DeliveryAttempt.objects.get(postback_id='aaa').pk}/change/"
    )
    assert "GET http://example.com/aaa" in detail.content.decode()


def test_a_search_for_a_host_looks_by_host_alone_and_a_postback_id_by_both(staff_client):
    for pid, host in [("ccc-0", "a.example:8080"), ("ddd-0", "ccc-0")]:
        DeliveryAttempt.objects.create(
            postback_id=pid, attempt=1, delivered_at=timezone.now(), host=host, response_code=500, outcome="failed"
        )

    with CaptureQueriesContext(connection) as by_host:
        found = staff_client.get("/admin/delivery/deliveryattempt/", {"q": "A.example:8080"}).content.decode()
    listed = [q["sql"] for q in by_host.captured_queries if "delivery_deliveryattempt" in q["sql"]]
    assert "ccc-0" in found and "ddd-0" not in found
    # Host alone: the host index answers in time order (docs/performance.md, 50,000,000 attempts).
    assert listed and all('"postback_id" =' not in sql for sql in listed)
    both = staff_client.get("/admin/delivery/deliveryattempt/", {"q": "ccc-0"}).content.decode()
    assert "ccc-0" in both and "ddd-0" in both  # the postback, and the host of that name


def test_the_login_page_and_admin_carry_the_products_name(staff_client):
    login = Client().get("/admin/login/", {"next": "/dashboard/"}).content.decode()
    assert "Postback delivery" in login and "Django administration" not in login
    index = staff_client.get("/admin/").content.decode()
    assert "<title>Administration | Postback delivery</title>" in index
    assert "Django administration" not in index and "Django site admin" not in index


def test_the_root_and_admins_site_link_lead_to_the_dashboard(staff_client):
    root = Client().get("/")
    assert root.status_code == 302 and root["Location"] == "/dashboard/"
    index = staff_client.get("/admin/").content.decode()
    assert '<a href="/dashboard/">Dashboard</a>' in index


def test_queues_and_workers_are_named_so_in_admin(staff_client):
    index = staff_client.get("/admin/").content.decode()
    assert "Queues and workers" in index
    assert "Django-RQ" not in index and "DJANGO_RQ" not in index.upper().replace("DJANGO_RQ:", "")
    response = staff_client.get("/admin/delivery/queuemonitor/")
    assert response.status_code == 302 and response["Location"] == "/admin/rq/"
    assert staff_client.get("/admin/rq/").status_code == 200


def test_the_settings_breadcrumb_names_the_page_once(staff_client):
    page = staff_client.get("/admin/delivery/deliverysettings/", follow=True).content.decode()
    crumbs = page.split('class="breadcrumbs">')[1].split("</div>")[0]
    assert crumbs.count("Delivery settings") == 1


def test_the_attempt_list_shows_whole_ids_urls_and_why_and_links_to_the_postback_page(staff_client):
    DeliveryAttempt.objects.create(
        postback_id="e749424065794b0f9f3b2a8c1d5e6f70-12",
        attempt=2,
        host="example.com",
        delivered_at=timezone.now(),
        response_code=503,
        response_body="down for maintenance",
        outcome="retry",
    )
    PostbackRequest.objects.create(
        postback_id="e749424065794b0f9f3b2a8c1d5e6f70-12",
        method="GET",
        url="http://example.com/" + "x" * 200,
        first_at=timezone.now(),
    )
    page = staff_client.get("/admin/delivery/deliveryattempt/").content.decode()
    assert "HTTP 503: down for maintenance" in page
    assert '<a href="/dashboard/postbacks/e749424065794b0f9f3b2a8c1d5e6f70-12/"' in page
    assert ">e749424065794b0f9f3b2a8c1d5e6f70-12</a>" in page  # the -N ending tells a request's postbacks apart
    assert "GET http://example.com/" + "x" * 200 in page  # wrapped in its cell, not cut


def test_the_attempt_list_filters_by_status_class_and_method_and_finds_a_host(staff_client):
    for pid, code, method, host in [
        ("a", 200, "GET", "a.example"),
        ("b", 404, "POST", "b.example"),
        ("c", None, "GET", "b.example"),
    ]:
        DeliveryAttempt.objects.create(
            postback_id=pid,
            attempt=1,
            host=host,
            delivered_at=timezone.now(),
            response_code=code,
            outcome="success" if code == 200 else "failed",
        )
        PostbackRequest.objects.create(
            postback_id=pid, method=method, url=f"http://{host}/{pid}", host=host, first_at=timezone.now()
        )

    def listed(**params: str) -> set[str]:
        page = staff_client.get("/admin/delivery/deliveryattempt/", params).content.decode()
        return {pid for pid in "abc" if f"/dashboard/postbacks/{pid}/" in page}

    assert listed(status="4xx") == {"b"}
    assert listed(status="none") == {"c"}
    assert listed(method="POST") == {"b"}
    assert listed(q="B.example") == {"b", "c"}
    assert listed(q="a") == {"a"}


def test_the_attempt_list_counts_only_so_far(monkeypatch):
    monkeypatch.setattr(CappedPaginator, "CAP", 2)
    for n in range(5):
        DeliveryAttempt.objects.create(
            postback_id=f"p{n}",
            attempt=1,
            delivered_at=timezone.now(),
            outcome="success",
        )
    assert CappedPaginator(DeliveryAttempt.objects.all(), 50).count == 3


def test_an_analyst_who_is_not_staff_signs_in_to_the_dashboard():
    User.objects.create_user("analyst", password="a-long-test-password")
    browser = Client()
    page = browser.get("/dashboard/", follow=True)
    assert page.redirect_chain[-1][0].startswith("/login/?next=/dashboard/")
    assert "Postback delivery" in page.content.decode()

    signed_in = browser.post(
        "/login/?next=/dashboard/", {"username": "analyst", "password": "a-long-test-password"}, follow=True
    )
    assert signed_in.redirect_chain[-1][0] == "/dashboard/"
    assert browser.get("/admin/").status_code == 302  # admin stays for staff
