"""The dashboard and admin as people use them, in a real browser (Debian's Chromium, through
Playwright), under the Content-Security-Policy the site sends: log in, read the charts after
real deliveries, switch the range, open a failed postback, replay it, and see the new attempt;
open admin's pages and save the delivery settings. Nothing may be refused by the policy.
Every page of ours, at 390 px and at 1280 px: no sideways scroll of the page, nothing drawn
over anything else, times written one way. Saves screenshots of the dashboard to
var/screenshots/."""

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.db import connections
from playwright.sync_api import Browser, Page, Response, expect, sync_playwright
from pytest_django.live_server_helper import LiveServer

from delivery.models import DeliveryAttempt, Destination, SigningSecret
from postbackproject import keys
from postbackproject.queue import get_connection
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
        # The test's database calls ran beside Playwright's event loop, where Django keeps a
        # connection of their own: left open, PostgreSQL would refuse to drop the test database.
        connections.close_all()


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


# --- every page on a phone and on a desk ------------------------------------------------------

# One way to write a time and one to write a date-time, on every page, in TIME_ZONE.
TIME = re.compile(r"\d{2}:\d{2}:\d{2}")
DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
# Anything that reads as a clock time (a host's port, "127.0.0.1:8000", does not).
CLOCK = re.compile(r"(?<![\d.:])\d{1,2}:\d{2}(?::\d{2})?(?![\d:])")
OTHER_TIME_WAYS = re.compile(
    r"\b(?:AM|PM)\b|[ap]\.m\.|\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.? \d{1,2}, \d{4}"
    r"|\d{4}-\d{2}-\d{2}T\d|\d{2}:\d{2}:\d{2} ?(?:UTC|GMT|[+-]\d{2}:?\d{2})"
)
PHONE = {"width": 390, "height": 844}
DESK = {"width": 1280, "height": 800}
# The page's own sideways scroll, and the outermost elements that stick out of the window.
SIDEWAYS = """() => {
    const width = window.innerWidth;
    const out = [];
    if (document.documentElement.scrollWidth > width) {
        for (const element of document.body.querySelectorAll("*")) {
            const right = element.getBoundingClientRect().right;
            const parent = element.parentElement.getBoundingClientRect().right;
            if (right > width + 1 && parent <= width + 1) {
                const name = `${element.tagName.toLowerCase()}#${element.id}.${element.className}`;
                out.push(`${name} ends at ${Math.round(right)}`);
            }
        }
    }
    return {scrollWidth: document.documentElement.scrollWidth, width: width, out: out.slice(0, 8)};
}"""
# Pairs of the dashboard's boxes drawn over each other (a box and what it holds excepted).
OVERLAPS = """(selector) => {
    const boxes = [...document.querySelectorAll(selector)].filter((element) => element.offsetParent !== null);
    const found = [];
    boxes.forEach((a, i) => boxes.slice(i + 1).forEach((b) => {
        if (a.contains(b) || b.contains(a)) return;
        const p = a.getBoundingClientRect(), q = b.getBoundingClientRect();
        if (p.left < q.right - 1 && q.left < p.right - 1 && p.top < q.bottom - 1 && q.top < p.bottom - 1) {
            found.push(`${a.id || a.className} over ${b.id || b.className}`);
        }
    }));
    return found;
}"""
FITS_ITS_BOX = (
    "(selector) => { const box = document.querySelector(selector); return box.scrollWidth <= box.clientWidth; }"
)
DASHBOARD_BOXES = ".controls, .live .figure, .panel, .canvas-box, .table-box, .scroll-x, #table-reasons, #table-latest"


def times_written_otherwise(text: str) -> list[str]:
    """Clock times not written HH:MM:SS, dates not followed by ' HH:MM:SS', 12-hour clocks,
    month names and zone suffixes: every way of writing a time but the one."""
    wrong = [clock for clock in CLOCK.findall(text) if not TIME.fullmatch(clock)]
    return wrong + [match.group(0) for match in OTHER_TIME_WAYS.finditer(text)]


def assert_fits_and_writes_times_one_way(page: Page, where: str) -> None:
    page.wait_for_load_state("load")
    sideways = page.evaluate(SIDEWAYS)
    assert sideways["scrollWidth"] <= sideways["width"], f"{where} scrolls sideways: {sideways}"
    assert times_written_otherwise(page.locator("body").inner_text()) == [], where


@pytest.mark.parametrize("screen", [PHONE, DESK], ids=["phone", "desk"])
def test_every_page_fits_a_phone_and_a_desk_and_writes_times_one_way(site, client, receiver, browser, screen):
    User.objects.create_superuser("admin", "admin@example.com", "a-long-test-password")
    receiver.answer(Reply(404, body=b"no such campaign, " * 20), Reply(200, body=b'{"status": "recorded"}'))
    long_url = receiver.url(
        "/postback/" + "segment/" * 30 + "?campaign={c}&" + "&".join(f"k{n}=v{n}" for n in range(20))
    )
    headers = {"Authorization": "Bearer " + "t0k3n" * 40, "X-Campaign-" + "long-name-" * 6: "campaign {c} " * 12}
    endpoint = {"method": "POST", "url": long_url, "headers": headers}
    document = {"endpoint": endpoint, "data": [{"c": "spring"}, {"c": "autumn"}]}
    assert ingest_json(client, document).status_code == 202
    deliver_everything()
    failed = DeliveryAttempt.objects.get(outcome="failed")
    delivered = DeliveryAttempt.objects.get(outcome="success")
    host = f"127.0.0.1:{receiver.port}"
    open_circuit_until_ms = (time.time() + 600) * 1000
    get_connection().zadd(
        keys.CIRCUITS_OPEN, {host: open_circuit_until_ms, "down." + "long-name." * 8 + "example": open_circuit_until_ms}
    )
    get_connection().hset(keys.CIRCUITS_FAILURES, host, 5)
    secret = SigningSecret.objects.create(label="2026 rotation")
    destination = Destination.objects.create(
        name="An ad network with a long name",
        host=host,
        url_prefix="/postback/" + "segment/" * 6,
        paused=True,
        rate_per_second=50,
        rate_burst=10,
        max_attempts=3,
        headers=[["Authorization", "Bearer hidden"], ["X-Campaign-" + "long-name-" * 4, "v"]],
    )
    Destination.objects.create(name="Whole host", host=host, total_timeout_seconds=30)

    page = browser.new_page(viewport=screen)
    refused = watch_policy(page)
    page.goto(f"{site.url}/login/?next=/dashboard/")
    assert_fits_and_writes_times_one_way(page, "login")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "a-long-test-password")
    page.click("input[type=submit]")

    wait_for_refresh(page, 0)
    page.wait_for_function("() => document.querySelectorAll('#table-latest tbody tr').length > 0")
    assert_fits_and_writes_times_one_way(page, "dashboard")
    assert page.evaluate(OVERLAPS, DASHBOARD_BOXES) == []
    topbar = page.locator(".topbar").bounding_box()
    assert topbar is not None and topbar["width"] >= page.evaluate("() => document.documentElement.clientWidth")
    for chart in ("volume", "latency"):
        labels = page.evaluate(f"() => Chart.getChart('chart-{chart}').data.labels")
        assert labels and all(TIME.fullmatch(label) for label in labels), labels
    latest = page.locator("#table-latest tbody tr").first.locator("td")
    assert DATE_TIME.fullmatch(latest.nth(0).inner_text())
    assert latest.nth(4).inner_text().startswith("HTTP 404: no such campaign")  # the reason, filled in
    if screen is DESK:  # a time and an id on one line each
        lines = "(element) => element.getClientRects().length"
        assert [latest.nth(0).locator("time").evaluate(lines), latest.nth(1).locator("a").evaluate(lines)] == [1, 1]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"dashboard-{screen['width']}.png"), full_page=True)

    page.goto(f"{site.url}/dashboard/?range=1h&host={host}")
    page.wait_for_function("() => document.querySelectorAll('#table-destination tbody tr').length == 2")
    assert_fits_and_writes_times_one_way(page, "a host's view with its destinations")
    expect(page.locator("#table-destination")).to_contain_text("paused")
    expect(page.locator("#table-hosts")).to_contain_text("An ad network with a long name")
    page.screenshot(path=str(SCREENSHOTS / f"host-{screen['width']}.png"), full_page=True)

    page.goto(f"{site.url}/dashboard/postbacks/{failed.postback_id}/")
    assert_fits_and_writes_times_one_way(page, "a failed postback's page")
    expect(page.locator("#sender-headers")).to_contain_text("X-Campaign-long-name-")
    page.goto(f"{site.url}/dashboard/postbacks/{delivered.postback_id}/")
    assert_fits_and_writes_times_one_way(page, "a delivered postback's page")
    expect(page.locator("#attempts thead")).to_contain_text("Response body")
    expect(page.locator("#attempts thead")).not_to_contain_text("Error")

    page.goto(f"{site.url}/admin/ingestion/senderkey/add/")
    page.fill("#id_name", "A sender with a long name")
    page.click("input[name=_save]")
    expect(page.locator("#sender-key")).to_have_count(1)
    assert_fits_and_writes_times_one_way(page, "the sender key page")

    for where in [
        "/admin/",
        "/admin/delivery/deliveryattempt/",
        f"/admin/delivery/deliveryattempt/{failed.pk}/change/",
        "/admin/delivery/deliveryattempt/replay/?since=2026-12-04+09%3A00%3A00&until=2026-12-04+10%3A00%3A00",
        "/admin/delivery/deliverysettings/",
        "/admin/delivery/circuitbreaker/",
        "/admin/delivery/signingsecret/",
        f"/admin/delivery/signingsecret/{secret.pk}/change/",
        "/admin/ingestion/senderkey/",
        "/admin/delivery/destination/",
        f"/admin/delivery/destination/{destination.pk}/change/",
    ]:
        page.goto(site.url + where)
        assert_fits_and_writes_times_one_way(page, where)
        if where == "/admin/delivery/deliveryattempt/":  # whole ids and times; at 1280 px, every column
            expect(page.locator("#result_list")).to_contain_text(failed.postback_id)
            expect(page.locator("#result_list")).to_contain_text("HTTP 404: no such campaign, no such campaign")
            assert DATE_TIME.fullmatch(page.locator("#result_list .field-started").first.inner_text())
            if screen is DESK:
                assert page.evaluate(FITS_ITS_BOX, "#changelist-form .results")
        if where == "/admin/delivery/circuitbreaker/":
            cells = page.locator("#content-main tbody tr").first.locator("td").all_inner_texts()
            assert [cell for cell in cells if DATE_TIME.fullmatch(cell)], cells  # open until when
    assert refused == []

    # django-rq's pages: their inline style is refused by the policy (see above), not our doing.
    for where in ["/admin/rq/", "/admin/rq/queues/0/"]:
        page.goto(site.url + where)
        assert_fits_and_writes_times_one_way(page, where)
