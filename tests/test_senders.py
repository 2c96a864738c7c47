"""Known senders: API keys issued in admin (kept as digests, shown once), presented in a header,
required or not; rate limits per key and per address, kept in Redis and shared by every web
process."""

import hashlib
import json
import re
from typing import Any

import pytest
import requests
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client

from ingestion.checks import check_ingestion_limits
from ingestion.models import SenderKey
from postbackproject import keys
from postbackproject.queue import get_connection
from tests.conftest import http_answers, wait_until
from tests.test_metrics import scrape

SAMPLE: dict[str, Any] = {
    "endpoint": {"method": "GET", "url": "http://sample_domain_endpoint.com/data?key={key}&value={value}"},
    "data": [{"key": "Azureus", "value": "Dendrobates"}],
}
BODY = json.dumps(SAMPLE).encode()


def issue(name: str = "shop", rate_limit: float | None = None) -> tuple[SenderKey, str]:
    sender = SenderKey(name=name, rate_limit=rate_limit)
    key = sender.issue_key()
    sender.save()
    return sender, key


def post(client, key: str | None = None, header: str = "bearer", path: str = "/ingest.php", **extra: str):
    if key is not None:
        extra["HTTP_AUTHORIZATION" if header == "bearer" else "HTTP_X_API_KEY"] = (
            f"Bearer {key}" if header == "bearer" else key
        )
    return client.generic("POST", path, BODY, **extra)


def queued_entries() -> int:
    return int(get_connection().xlen(keys.INBOX))


@pytest.fixture
def required(settings):
    settings.INGEST_REQUIRE_SENDER_KEY = True


@pytest.fixture
def staff_client(client):
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "a-long-test-password"))
    return client


# --- keys --------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/ingest.php", "/i"])
def test_it_refuses_a_request_without_a_key_when_keys_are_required(client, required, path):
    response = post(client, path=path)

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="postbacks"'
    assert "sender key is required" in response.json()["error"]
    assert queued_entries() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["bearer", "x-api-key"])
@pytest.mark.parametrize("path", ["/ingest.php", "/i"])
def test_it_accepts_a_valid_key_in_either_header_on_both_paths(client, required, header, path):
    _, key = issue()

    response = post(client, key, header, path)

    assert response.status_code == 202
    assert queued_entries() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("is_required", [True, False])
@pytest.mark.parametrize("presented", ["pbk_not-a-key-we-issued", ""], ids=["unknown", "empty"])
@pytest.mark.parametrize("header", ["bearer", "x-api-key"])
def test_it_refuses_a_wrong_key_whether_or_not_keys_are_required(client, settings, is_required, presented, header):
    settings.INGEST_REQUIRE_SENDER_KEY = is_required
    issue()

    response = post(client, presented, header)

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith('Bearer realm="postbacks"')
    assert response.json()["error"] == "the sender key is not valid (unknown or revoked)"
    assert queued_entries() == 0


@pytest.mark.django_db
def test_the_ingest_log_line_names_the_keys_prefix_and_no_more(client, caplog):
    sender, key = issue()

    with caplog.at_level("INFO", logger="ingestion.requests"):
        post(client, key)
        post(client, "a-password-sent-by-mistake")

    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "ingestion.requests"]
    accepted, refused = lines
    assert accepted["sender_key"] == sender.prefix == key[:12]
    assert "sender_key" not in refused
    assert key[12:] not in caplog.text
    assert "a-password" not in caplog.text


@pytest.mark.django_db
def test_it_refuses_a_key_once_it_is_revoked(client, required):
    sender, key = issue()
    assert post(client, key).status_code == 202

    sender.active = False
    sender.save()

    assert post(client, key).status_code == 401
    assert queued_entries() == 1


@pytest.mark.django_db
def test_it_serves_a_request_without_a_key_when_keys_are_not_required(client, settings):
    settings.INGEST_REQUIRE_SENDER_KEY = False
    issue()

    assert post(client).status_code == 202
    assert post(client, HTTP_AUTHORIZATION="Basic dXNlcjpwdw==").status_code == 202  # not a sender key


# --- admin -------------------------------------------------------------------------------


KEY_BOX = re.compile(r'id="sender-key"[^>]*value="(pbk_[A-Za-z0-9_-]{43})"')


def issue_in_admin(staff_client, name: str = "Acme shop") -> tuple[Any, str]:
    """Issue a key as staff do: the form's POST redirects to the page that shows it."""
    posted = staff_client.post("/admin/ingestion/senderkey/add/", {"name": name, "rate_limit": ""})
    assert posted.status_code == 302
    assert re.fullmatch(r"/admin/ingestion/senderkey/\d+/issued/", posted["Location"])
    response = staff_client.get(posted["Location"])
    found = KEY_BOX.search(response.content.decode())
    assert found, response.content.decode()
    return response, found.group(1)


@pytest.mark.django_db
def test_admin_shows_a_new_key_once_and_never_again(staff_client, required):
    response, key = issue_in_admin(staff_client)
    sender = SenderKey.objects.get()

    assert "no-store" in response["Cache-Control"]
    assert sender.prefix == key[:12]
    for page in ("/admin/ingestion/senderkey/", f"/admin/ingestion/senderkey/{sender.pk}/change/"):
        shown = staff_client.get(page).content.decode()
        assert sender.prefix in shown
        assert key not in shown
    assert post(staff_client, key).status_code == 202


@pytest.mark.django_db
def test_reloading_the_issued_page_never_shows_the_key_again_nor_issues_another(staff_client):
    response, key = issue_in_admin(staff_client)

    for _ in range(3):
        reloaded = staff_client.get(response.request["PATH_INFO"])
        page = reloaded.content.decode()
        assert reloaded.status_code == 200 and "no-store" in reloaded["Cache-Control"]
        assert key not in page and not KEY_BOX.search(page)
        assert "This key was already shown" in page

    assert SenderKey.objects.filter(active=True).count() == 1


@pytest.mark.django_db
def test_the_issued_page_shows_nothing_in_another_browser(staff_client):
    posted = staff_client.post("/admin/ingestion/senderkey/add/", {"name": "Acme", "rate_limit": ""})
    another_browser = Client()
    another_browser.force_login(User.objects.create_superuser("other", "other@example.com", "a-long-test-password"))

    page = another_browser.get(posted["Location"]).content.decode()

    assert "This key was already shown" in page and not KEY_BOX.search(page)


@pytest.mark.django_db
def test_the_key_crosses_the_redirect_stored_nowhere_in_clear(staff_client):
    posted = staff_client.post("/admin/ingestion/senderkey/add/", {"name": "Acme", "rate_limit": ""})
    stored_between = every_row_of_every_table() + repr([s.get_decoded() for s in Session.objects.all()])
    cookies_between = {name: morsel.value for name, morsel in staff_client.cookies.items()}

    key = KEY_BOX.search(staff_client.get(posted["Location"]).content.decode())
    assert key
    secret = key.group(1)[12:]
    assert secret not in stored_between
    assert all(secret not in value for value in cookies_between.values())
    assert posted.cookies[next(name for name in posted.cookies if name.startswith("shown_once_"))]["httponly"]


@pytest.mark.django_db
def test_a_key_is_stored_only_as_its_digest(staff_client):
    _, key = issue_in_admin(staff_client)

    assert SenderKey.objects.get().key_hash == hashlib.sha256(key.encode()).hexdigest()
    stored = every_row_of_every_table()
    assert key[:12] in stored  # the prefix is kept, to tell keys apart: the scan sees the row
    assert key[12:] not in stored
    assert all(key[12:] not in json.dumps(session.get_decoded()) for session in Session.objects.all())


@pytest.mark.django_db
def test_admin_revokes_the_selected_keys(staff_client, required):
    sender, key = issue()
    assert post(staff_client, key).status_code == 202

    response = staff_client.post(
        "/admin/ingestion/senderkey/", {"action": "revoke", "_selected_action": [sender.pk]}, follow=True
    )

    assert "Revoked 1 key(s)" in response.content.decode()
    assert post(staff_client, key).status_code == 401


def every_row_of_every_table() -> str:
    with connection.cursor() as cursor:
        rows = []
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            rows.extend(cursor.fetchall())
    return repr(rows)


# --- rate limits -------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_key_over_its_limit_gets_429_with_retry_after_and_nothing_is_queued(client, settings):
    settings.INGEST_RATE_LIMIT_PER_KEY = 100.0  # the key's own limit overrides this
    _, key = issue(rate_limit=0.1)
    assert post(client, key).status_code == 202

    refused = post(client, key)

    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 10
    assert "rate limit of this sender key (0.1 requests per second)" in refused.json()["error"]
    assert queued_entries() == 1
    assert get_connection().hvals(keys.ACCEPTED) == [b"1"]


@pytest.mark.django_db
def test_the_default_per_key_limit_applies_to_keys_without_their_own(client, settings):
    settings.INGEST_RATE_LIMIT_PER_KEY = 0.1
    _, limited = issue("limited")
    _, unlimited = issue("unlimited", rate_limit=0)

    assert [post(client, limited).status_code for _ in range(2)] == [202, 429]
    assert [post(client, unlimited).status_code for _ in range(5)] == [202] * 5


@pytest.mark.django_db
def test_another_key_is_not_held_back_by_one_over_its_limit(client):
    _, first = issue("first", rate_limit=0.1)
    _, second = issue("second", rate_limit=0.1)
    assert [post(client, first).status_code for _ in range(2)] == [202, 429]

    assert post(client, second).status_code == 202


@pytest.mark.django_db
def test_a_key_may_send_its_rate_at_once_and_no_more(client):
    _, key = issue(rate_limit=5)

    answers = [post(client, key).status_code for _ in range(6)]

    assert answers[:5] == [202] * 5  # five a second: a burst of five
    assert 429 in answers[5:]


@pytest.mark.django_db
def test_an_address_over_its_limit_gets_429_and_other_addresses_do_not(client, settings):
    settings.INGEST_RATE_LIMIT_PER_ADDRESS = 0.1
    assert post(client, REMOTE_ADDR="203.0.113.7").status_code == 202

    refused = post(client, REMOTE_ADDR="203.0.113.7")

    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 10
    assert "rate limit of this address" in refused.json()["error"]
    assert queued_entries() == 1
    assert post(client, REMOTE_ADDR="203.0.113.8").status_code == 202


@pytest.mark.django_db
def test_the_address_limit_counts_the_sender_behind_nginx_and_ipv6_by_its_64(client, settings):
    settings.INGEST_RATE_LIMIT_PER_ADDRESS = 0.1
    settings.TRUSTED_PROXIES = ["127.0.0.1/32"]  # as postback-web.service sets it
    assert post(client, REMOTE_ADDR="127.0.0.1", HTTP_X_REAL_IP="198.51.100.1").status_code == 202
    assert post(client, REMOTE_ADDR="127.0.0.1", HTTP_X_REAL_IP="198.51.100.1").status_code == 429
    assert post(client, REMOTE_ADDR="127.0.0.1", HTTP_X_REAL_IP="198.51.100.2").status_code == 202

    assert post(client, REMOTE_ADDR="2001:db8:1:2::1").status_code == 202
    assert post(client, REMOTE_ADDR="2001:db8:1:2:ffff::9").status_code == 429  # the same /64
    assert post(client, REMOTE_ADDR="2001:db8:1:3::1").status_code == 202


def limited_addresses() -> set[str]:
    prefix = keys.rate_per_address("")
    return {key.decode().removeprefix(prefix) for key in get_connection().scan_iter(f"{prefix}*")}


@pytest.mark.django_db
def test_a_rotated_x_real_ip_from_an_untrusted_peer_is_limited_as_the_peer(client, settings):
    """Reached directly (the local run), a sender cannot pick the address it is counted as."""
    settings.INGEST_RATE_LIMIT_PER_ADDRESS = 2
    statuses = [
        post(
            client, REMOTE_ADDR="127.0.0.1", HTTP_X_REAL_IP=f"198.51.100.{n}", HTTP_X_FORWARDED_FOR=f"192.0.2.{n}"
        ).status_code
        for n in range(10)
    ]

    assert statuses.count(202) == 2 and statuses[:2] == [202, 202]
    assert limited_addresses() == {"127.0.0.1"}


@pytest.mark.django_db
def test_a_trusted_proxy_names_the_client(client, settings):
    settings.INGEST_RATE_LIMIT_PER_ADDRESS = 0.1
    settings.TRUSTED_PROXIES = ["10.0.0.0/8", "127.0.0.1"]
    assert post(client, REMOTE_ADDR="10.1.2.3", HTTP_X_REAL_IP="198.51.100.1").status_code == 202
    assert post(client, REMOTE_ADDR="10.9.9.9", HTTP_X_REAL_IP="198.51.100.1").status_code == 429
    assert post(client, REMOTE_ADDR="::ffff:127.0.0.1", HTTP_X_REAL_IP="198.51.100.2").status_code == 202
    assert post(client, REMOTE_ADDR="203.0.113.5", HTTP_X_REAL_IP="198.51.100.3").status_code == 202

    assert limited_addresses() == {"198.51.100.1", "198.51.100.2", "203.0.113.5"}


@pytest.mark.django_db
def test_only_the_nearest_untrusted_forwarded_hop_is_the_client(client, settings):
    """X-Forwarded-For's left part is what the client wrote; proxies append on the right."""
    settings.INGEST_RATE_LIMIT_PER_ADDRESS = 0.1
    settings.TRUSTED_PROXIES = ["127.0.0.1/32", "10.0.0.0/8"]
    for claimed in ["192.0.2.1", "192.0.2.2"]:
        post(client, REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR=f"{claimed}, 198.51.100.7, 10.0.0.2")

    assert limited_addresses() == {"198.51.100.7"}


@pytest.mark.django_db
def test_an_ipv4_mapped_client_is_limited_by_its_ipv4_address(client, settings):
    """A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d: all in ::/64, with ::1."""
    settings.INGEST_RATE_LIMIT_PER_ADDRESS = 0.1
    assert post(client, REMOTE_ADDR="::ffff:198.51.100.1").status_code == 202
    assert post(client, REMOTE_ADDR="198.51.100.1").status_code == 429  # the same client
    assert post(client, REMOTE_ADDR="::ffff:198.51.100.2").status_code == 202
    assert post(client, REMOTE_ADDR="::1").status_code == 202

    assert limited_addresses() == {"198.51.100.1", "198.51.100.2", "::/64"}


def test_trusted_proxies_that_are_not_networks_are_a_configuration_error(settings):
    settings.TRUSTED_PROXIES = ["127.0.0.1/32", "nginx", "10.0.0.0/33"]

    errors = check_ingestion_limits(None)

    assert [(error.id, error.msg) for error in errors] == [
        ("ingestion.E003", "TRUSTED_PROXIES: 'nginx' is not a network (CIDR)."),
        ("ingestion.E003", "TRUSTED_PROXIES: '10.0.0.0/33' is not a network (CIDR)."),
    ]


@pytest.mark.django_db
def test_a_request_with_a_key_is_limited_by_its_key_not_its_address(client, settings):
    settings.INGEST_RATE_LIMIT_PER_ADDRESS = 0.1
    _, key = issue(rate_limit=0)
    assert post(client).status_code == 202
    assert post(client).status_code == 429

    assert [post(client, key).status_code for _ in range(3)] == [202] * 3


@pytest.mark.django_db
def test_a_limited_sender_is_accepted_again_once_its_allowance_returns(client):
    _, key = issue(rate_limit=2)
    wait_until(lambda: post(client, key).status_code == 429, what="the key to reach its limit")
    queued = queued_entries()

    wait_until(lambda: post(client, key).status_code == 202, timeout=5, what="the key to be accepted again")

    assert queued_entries() == queued + 1


@pytest.mark.django_db
def test_a_refused_request_is_not_charged_to_its_limit(client):
    """Refusals (429, and 400 or 401, which never reach Redis) leave the allowance alone."""
    _, key = issue(rate_limit=1)
    assert client.generic("POST", "/i", b"not json", HTTP_X_API_KEY=key).status_code == 400

    assert post(client, key, "x-api-key").status_code == 202


@pytest.mark.django_db
def test_a_limited_request_is_429_even_when_replicas_are_awaited(client, settings):
    settings.REDIS_WAIT_FOR_REPLICAS = 1  # the suite's Redis has none: accepted requests get 503
    settings.REDIS_WAIT_TIMEOUT_MS = 10
    _, key = issue(rate_limit=0.1)
    assert post(client, key).status_code == 503

    assert post(client, key).status_code == 429


@pytest.mark.django_db(transaction=True)
def test_401_and_429_are_counted_as_rejected_requests(client, settings):
    settings.METRICS_TOKEN = "scrape-me"
    settings.INGEST_REQUIRE_SENDER_KEY = True
    _, key = issue(rate_limit=0.1)
    before = scrape(client, "scrape-me")

    post(client)
    post(client, "pbk_wrong")
    post(client, key)
    post(client, key)

    after = scrape(client, "scrape-me")

    def counted(status: str) -> float:
        sample = ("postback_ingest_rejected_total", (("status", status),))
        return after.get(sample, 0) - before.get(sample, 0)

    assert (counted("401"), counted("429")) == (2, 1)


def test_a_negative_rate_limit_is_a_configuration_error(settings):
    settings.INGEST_RATE_LIMIT_PER_ADDRESS = -1

    assert [error.id for error in check_ingestion_limits(None)] == ["ingestion.E002"]


# --- several web processes ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_web_processes_share_the_limits_and_stop_taking_a_revoked_key(processes):
    """Two gunicorn workers, each with its own key cache: the limit is one, and a key revoked
    elsewhere is refused within the cache's few seconds."""
    sender, key = issue(rate_limit=0.1)
    url = processes.web(WEB_CONCURRENCY="2", INGEST_REQUIRE_SENDER_KEY="true") + "/i"

    def send(**headers: str) -> int:
        return requests.post(url, data=BODY, headers=headers, timeout=10).status_code

    wait_until(lambda: http_answers(url, 401, "POST"), timeout=30, what="the web process")
    # A fresh connection each time: gunicorn's workers take turns at accepting them.
    statuses = [send(Authorization=f"Bearer {key}") for _ in range(8)]
    assert statuses.count(202) == 1
    assert statuses.count(429) == 7
    assert send() == 401

    sender.active = False
    sender.save()

    wait_until(
        lambda: all(send(Authorization=f"Bearer {key}") == 401 for _ in range(4)),
        timeout=15,
        what="every web process to refuse the revoked key",
    )
    assert queued_entries() == 1


def test_a_key_that_cannot_be_checked_gets_503_and_a_request_without_one_is_served(processes, tmp_path):
    """A web process whose database cannot be opened has never read the keys: it cannot tell
    a valid key from a wrong one, so it asks the sender to come back rather than answer 401."""
    url = processes.web(WEB_CONCURRENCY="1", DATABASE_URL=f"sqlite:///{tmp_path}/no/such/folder/db.sqlite3") + "/i"
    wait_until(lambda: http_answers(url, 400, "POST"), timeout=30, what="the web process")

    refused = requests.post(url, data=BODY, headers={"X-API-Key": "pbk_whatever"}, timeout=10)

    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "5"
    assert refused.json()["error"] == "sender keys cannot be checked now"
    assert requests.post(url, data=BODY, timeout=10).status_code == 202
