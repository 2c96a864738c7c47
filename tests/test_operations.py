"""Operations endpoints: what load balancers and monitoring see."""

import io
import json

import pytest
import requests
from django.core.management import call_command

from tests.conftest import free_port, http_answers, ingest_json, run_worker, use_redis, wait_until


@pytest.mark.django_db
def test_healthz_answers_without_redis_or_database(client, settings, django_assert_num_queries):
    use_redis(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there

    with django_assert_num_queries(0):
        response = client.get("/healthz")

    assert response.status_code == 200
    assert response.content == b"ok\n"


def test_healthz_is_not_redirected_to_https(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    assert client.get("/healthz").status_code == 200
    assert client.get("/dashboard/").status_code == 301


def test_healthz_takes_only_get_and_head(client):
    assert client.head("/healthz").status_code == 200
    assert client.post("/healthz").status_code == 405


@pytest.mark.django_db
def test_readyz_is_ready_when_redis_and_the_database_answer(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"redis": "ok", "database": "ok", "backlog": "ok"}}


@pytest.mark.django_db
def test_readyz_says_redis_is_down(client):
    use_redis(f"redis://127.0.0.1:{free_port()}/0")

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok"
    assert response.json()["checks"]["redis"].startswith("unreachable")
    assert response.json()["checks"]["backlog"] == "unknown: Redis is unreachable"
    assert response.json()["error"].startswith("not ready: redis: unreachable")


@pytest.mark.django_db
def test_readyz_says_the_backlog_is_full(client, settings):
    settings.INGEST_MAX_QUEUED_JOBS = 1
    ingest_json(client, {"endpoint": {"method": "GET", "url": "http://h/"}, "data": [{}]})

    response = client.get("/readyz")

    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["backlog"] == "full: 1 inbox entries, the limit (INGEST_MAX_QUEUED_JOBS) is 1"
    assert (checks["redis"], checks["database"]) == ("ok", "ok")
    assert response.json()["error"] == f"not ready: backlog: {checks['backlog']}"


@pytest.mark.django_db
def test_readyz_says_redis_memory_is_nearly_full(client, clean_redis):
    clean_redis.config_set("maxmemory", "1mb")
    try:
        response = client.get("/readyz")
    finally:
        clean_redis.config_set("maxmemory", "0")

    assert response.status_code == 503
    assert response.json()["checks"]["redis"].startswith("memory nearly full")
    assert response.json()["checks"]["backlog"] == "ok"


def test_readyz_says_the_database_is_down_and_healthz_still_answers(processes, tmp_path):
    """A real web process whose database cannot be opened."""
    web = processes.web(WEB_CONCURRENCY="1", DATABASE_URL=f"sqlite:///{tmp_path}/no/such/folder/db.sqlite3")
    wait_until(lambda: http_answers(f"{web}/healthz"), timeout=30, what="the web process")

    ready = requests.get(f"{web}/readyz", timeout=10)

    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"] == "ok"
    assert ready.json()["checks"]["database"].startswith("unreachable")
    assert requests.get(f"{web}/healthz", timeout=10).status_code == 200


@pytest.fixture
def profiles(settings, tmp_path):
    settings.PROFILE_DIR = tmp_path / "profiles"
    settings.METRICS_TOKEN = "ops-secret"
    return settings.PROFILE_DIR


@pytest.mark.django_db
def test_a_request_carrying_the_profile_header_is_profiled(client, profiles):
    body = json.dumps({"endpoint": {"method": "GET", "url": "http://h/"}, "data": [{}]})
    assert client.generic("POST", "/i", body, HTTP_X_PROFILE="wrong").status_code == 202
    assert not profiles.exists()

    assert client.generic("POST", "/i", body, HTTP_X_PROFILE="ops-secret").status_code == 202

    [html] = profiles.glob("*-request-POST-_i.html")
    assert "pyinstrument" in html.read_text()
    assert "take" in html.with_suffix(".txt").read_text()  # the ingest view's own steps


@pytest.mark.django_db(transaction=True)
def test_profilejob_profiles_the_next_drain_job_only(client, profiles, receiver):
    document = {"endpoint": {"method": "GET", "url": receiver.url("/p")}, "data": [{}]}
    call_command("profilejob", stdout=io.StringIO())
    ingest_json(client, document)
    run_worker()
    ingest_json(client, document)
    run_worker()

    [report] = profiles.glob("*-job-drain-*.txt")
    assert "Drainer.run" in report.read_text()
    assert len(receiver.requests) == 2
