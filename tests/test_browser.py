"""The dashboard and admin as people use them, in a real browser (Debian's Chromium, through
Playwright), under the Content-Security-Policy the site sends: log in, read the charts after
real deliveries, switch the range, open a failed postback, replay it, and see the new attempt;
open admin's pages and save the delivery settings. Nothing may be refused by the policy.
Saves a screenshot of the dashboard to var/screenshots/."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.db import connections
from playwright.sync_api import Browser, Page, Response, expect, sync_playwright
from pytest_django.live_server_helper import LiveServer

from delivery.models import DeliveryAttempt
from postbackproject.settings import BASE_DIR
from tests.conftest import Reply, deliver_everything, ingest_json

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = "/usr/bin/chromium"
# The machine has no network: nothing in the browser may try to reach out.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = BASE_DIR / "var" / "screenshots"
# Chromium logs each refusal to the console itself; the page's securitypolicyviolation event
# is logged too, in case a refusal's message is ever worded otherwise.
REPORT_VIOLATIONS = """document.addEventListener("securitypolicyviolation", (event) =>
    console.error(`Content Security Policy violation: ${event.violatedDirective} ${event.blockedURI}`));"""


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    """The web app on a free port, for this test only. Its request threads close their
    database connections after each request: threads kept for the browser's keep-alive
    connections would otherwise hold one past the session, and PostgreSQL would refuse to
    drop the test database."""
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 0)
    server = LiveServer("localhost")
    yield server
    server.stop()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    # Playwright's sync API runs an event loop in this thread; the test's own database calls
    # are still plain synchronous ones, between browser steps.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (deploy/test.sh does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


def chart_total(page: Page, chart: str, label: str) -> float:
    """The sum of one series as Chart.js holds it: what the chart draws."""
    return float(
        page.evaluate(
            """([chart, label]) => {
                const found = Chart.getChart("chart-" + chart).data.datasets.find((d) => d.label === label);
                return found.data.reduce((sum, value) => sum + (value || 0), 0);
            }""",
            [chart, label],
        )
    )


def watch_policy(page: Page) -> list[str]:
    """The page's Content-Security-Policy refusals, as they happen."""
    refused: list[str] = []
    page.add_init_script(REPORT_VIOLATIONS)
    page.on(
        "console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None
    )
    return refused


def policy_of(response: Response | None) -> set[str]:
    """The directives of the Content-Security-Policy a page was served with (in any order)."""
    assert response is not None
    return {directive.strip() for directive in response.headers["content-security-policy"].split(";")}


def wait_for_refresh(page: Page, before: int) -> None:
    page.wait_for_function(f"() => Number(document.getElementById('dashboard')?.dataset.refreshes || 0) > {before}")


def refreshes(page: Page) -> int:
    return int(page.evaluate("() => Number(document.getElementById('dashboard').dataset.refreshes || 0)"))


def test_an_analyst_reads_the_dashboard_and_replays_a_failed_postback(site, client, receiver, browser):
    User.objects.create_superuser("analyst", "analyst@example.com", "a-long-test-password")
    receiver.answer(Reply(404, body=b"no such campaign"))
    document = {"endpoint": {"method": "GET", "url": receiver.url("/p?n={n}")}, "data": [{"n": n} for n in range(3)]}
    assert ingest_json(client, document).status_code == 202
    deliver_everything()
    failed = DeliveryAttempt.objects.get(outcome="failed")
    delivered = DeliveryAttempt.objects.filter(outcome="success").count()
    assert delivered == 2

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    refused = watch_policy(page)
    login = page.goto(f"{site.url}/dashboard/?range=1h")
    assert "script-src 'self'" in policy_of(login)
    expect(page.locator("#site-name")).to_have_text("Postback delivery")  # the login page
    page.fill("#id_username", "analyst")
    page.fill("#id_password", "a-long-test-password")
    with page.expect_response(f"{site.url}/dashboard/?range=1h") as dashboard:
        page.click("input[type=submit]")
    assert policy_of(dashboard.value) == policy_of(login)

    wait_for_refresh(page, 0)
    assert chart_total(page, "volume", "delivered") == delivered
    assert chart_total(page, "volume", "failed") == 1
    assert chart_total(page, "volume", "accepted") == 3
    assert chart_total(page, "codes", "4xx") == 1
    footer = page.locator("#table-volume tfoot td")
    expect(footer.nth(0)).to_have_text("3")  # accepted, in the table beside the chart
    expect(footer.nth(1)).to_have_text(str(delivered))
    host = f"127.0.0.1:{receiver.port}"
    host_row = page.locator("#table-hosts tbody tr", has_text=host)
    expect(host_row.locator("td").nth(0)).to_have_text("3")

    before = refreshes(page)
    page.click("button[data-range='24h']")
    wait_for_refresh(page, before)
    expect(page.locator("button[data-range='24h']")).to_have_attribute("aria-pressed", "true")
    assert "range=24h" in page.url
    assert len(page.evaluate("() => Chart.getChart('chart-volume').data.labels")) == 96
    assert chart_total(page, "volume", "delivered") == delivered
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)

    before = refreshes(page)
    host_row.locator("a").click()  # one host: its charts and why it failed
    wait_for_refresh(page, before)
    expect(page.locator("#host-name")).to_have_text(host)
    expect(page.locator("#table-reasons tbody")).to_contain_text("HTTP 404: no such campaign")
    page.locator("#table-latest a", has_text=failed.postback_id).click()

    expect(page.locator("h1")).to_contain_text(failed.postback_id)
    expect(page.locator("#attempts tbody tr")).to_have_count(1)
    page.click("#replay")
    expect(page.locator(".messages")).to_contain_text("queued again")
    deliver_everything()
    page.reload()
    expect(page.locator("#attempts tbody tr")).to_have_count(2)
    expect(page.locator("#attempts tbody tr").nth(1)).to_contain_text("success")
    expect(page.locator("#replay")).to_have_count(0)
    assert refused == []  # nothing inline was blocked

    page.goto(f"{site.url}/admin/delivery/deliveryattempt/")  # fits 1280 px, error column and all
    expect(page.locator("#result_list tbody tr")).to_have_count(4)
    expect(page.locator("#result_list")).to_contain_text("HTTP 404: no such campaign")
    error_column = page.locator("#result_list th.column-short_why").bounding_box()
    assert error_column is not None and error_column["x"] + error_column["width"] <= 1280
    page.click("text=Dashboard")
    expect(page.locator("#dashboard")).to_have_count(1)
    assert refused == []


def test_an_admin_works_through_admins_pages_under_the_policy(site, client, receiver, browser):
    admin = User.objects.create_superuser("admin", "admin@example.com", "a-long-test-password")
    receiver.answer(Reply(503, body=b"down for maintenance"))
    document = {"endpoint": {"method": "GET", "url": receiver.url("/p?n={n}")}, "data": [{"n": 1}, {"n": 2}]}
    assert ingest_json(client, document).status_code == 202
    deliver_everything()

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    refused = watch_policy(page)
    login = page.goto(f"{site.url}/admin/")
    assert "frame-ancestors 'none'" in policy_of(login)
    page.fill("#id_username", "admin")
    page.fill("#id_password", "a-long-test-password")
    page.click("input[type=submit]")
    expect(page.locator("#content h1")).to_have_text("Administration")  # the index

    attempts = page.goto(f"{site.url}/admin/delivery/deliveryattempt/")
    assert policy_of(attempts) == policy_of(login)
    expect(page.locator("#result_list")).to_contain_text("HTTP 503: down for maintenance")
    page.click("#action-toggle")  # admin's actions.js: select every row
    expect(page.locator("tr input.action-select:checked")).to_have_count(3)

    page.goto(f"{site.url}/admin/auth/user/{admin.pk}/change/")  # a change form with admin's widgets
    expect(page.locator("#id_user_permissions_from")).to_have_count(1)  # built by SelectFilter2.js
    expect(page.locator("#id_last_login_0 + .datetimeshortcuts")).to_have_count(1)  # DateTimeShortcuts.js

    page.goto(f"{site.url}/admin/delivery/deliverysettings/")  # the settings form
    page.fill("#id_max_attempts", "7")
    page.click("input[name=_save]")
    expect(page.locator(".messagelist")).to_contain_text("was changed successfully")
    page.click("text=Dashboard")
    wait_for_refresh(page, 0)
    assert chart_total(page, "volume", "accepted") == 2
    assert refused == []

    # django-rq's pages (Queues and workers) are the known exception: the policy refuses their
    # inline <style> (a column width) and, on job lists, an inline script that is dead code
    # under Django 5.2 (admin's actions.js sets the list up itself). Nothing else.
    page.goto(f"{site.url}/admin/rq/queues/0/")
    expect(page.locator("#content h1, #content h2").first).to_be_visible()
    page.goto(f"{site.url}/admin/rq/")
    expect(page.locator("#changelist").first).to_contain_text("postbacks")
    assert sorted(set(message for message in refused if "violation:" in message)) == [
        "Content Security Policy violation: script-src-elem inline",
        "Content Security Policy violation: style-src-elem inline",
    ]
