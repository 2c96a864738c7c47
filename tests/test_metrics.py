"""/metrics: Prometheus's text format, behind a bearer token, adding up every process."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from delivery.models import DeliverySettings
from postbackproject import keys, shards
from postbackproject.queue import get_connection
from postbackproject.settings import BASE_DIR
from tests.conftest import Reply, http_answers, ingest_json, run_worker, service_env, success_ids, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def token(settings):
    settings.METRICS_TOKEN = "scrape-me"
    return "scrape-me"


def scrape(client, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def test_metrics_are_a_404_when_no_token_is_configured(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 404


@pytest.mark.parametrize("header", [None, "Bearer wrong", "scrape-me", "Basic c2NyYXBlLW1l"])
def test_metrics_need_the_bearer_token(client, token, header):
    extra = {"HTTP_AUTHORIZATION": header} if header else {}
    response = client.get("/metrics", **extra)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_metrics_add_up_ingestion_here_and_delivery_in_a_worker_process(client, token, receiver, processes):
    DeliverySettings(backoff_base_seconds=60).save()
    before = scrape(client, token)
    receiver.answer(Reply(503))
    document = {"endpoint": {"method": "GET", "url": receiver.url("/m?n={n}")}, "data": [{"n": n} for n in range(3)]}
    ingest_json(client, document)
    client.generic("POST", "/ingest.php", b"not json")
    processes.worker()
    wait_until(lambda: len(success_ids()) == 2, timeout=30, what="two deliveries by the worker process")

    def counted(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return scrape(client, token).get(key, 0) - before.get(key, 0)

    wait_until(lambda: counted("postback_delivery_attempts_total", outcome="retry") == 1, what="the worker's counts")
    assert counted("postback_ingested_total") == 3
    assert counted("postback_ingest_rejected_total", status="400") == 1
    assert counted("postback_delivery_attempts_total", outcome="success") == 2
    assert counted("postback_delivery_duration_seconds_count") == 3
    now = scrape(client, token)
    assert now[("postback_scheduled_retries", ())] == 1
    assert now[("postback_workers", ())] >= 1
    assert now[("postback_ready", ())] == 1
    assert now[("postback_redis_up", ())] == 1


def test_circuits_past_their_open_time_are_counted_as_probe_due_not_open(client, token):
    redis = get_connection()
    seconds, micros = redis.time()
    now_ms = seconds * 1000 + micros // 1000
    redis.zadd(keys.CIRCUITS_OPEN, {"back.example": now_ms - 1000, "gone.example": now_ms - 2000})
    redis.zadd(keys.CIRCUITS_OPEN, {"down.example": now_ms + 60_000})

    figures = scrape(client, token)

    assert figures[("postback_circuits_open", ())] == 1
    assert figures[("postback_circuits_probe_due", ())] == 2


def test_the_inbox_depth_is_given_in_all_and_per_shard(client, token, settings, receiver):
    settings.INBOX_SHARDS = 2
    document = {"endpoint": {"method": "GET", "url": receiver.url("/m")}, "data": [{}]}
    for _ in range(3):
        assert ingest_json(client, document).status_code == 202
    first, second = shards.configured()

    figures = scrape(client, token)

    assert figures[("postback_queue_depth", ())] == 3
    assert figures[("postback_inbox_shard_depth", (("shard", first.id),))] == get_connection().xlen(first.inbox)
    assert figures[("postback_inbox_shard_depth", (("shard", second.id),))] == get_connection().xlen(second.inbox)
    assert {get_connection().xlen(first.inbox), get_connection().xlen(second.inbox)} == {1, 2}


def scraped(base_url: str, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_web_and_worker_started_directly_without_a_metrics_folder_share_the_default_one(receiver, processes):
    """gunicorn and rqworker as the contract starts them, PROMETHEUS_MULTIPROC_DIR unset."""
    web = processes.web(WEB_CONCURRENCY="2", METRICS_TOKEN="scrape-me", PROMETHEUS_MULTIPROC_DIR=None)
    wait_until(lambda: http_answers(f"{web}/healthz"), timeout=30, what="the web process")
    before = scraped(web, "scrape-me")
    document = {"endpoint": {"method": "GET", "url": receiver.url("/d?n={n}")}, "data": [{"n": 1}, {"n": 2}]}
    assert requests.post(f"{web}/ingest.php", data=json.dumps(document), timeout=10).status_code == 202

    processes.worker(PROMETHEUS_MULTIPROC_DIR=None)
    wait_until(lambda: len(success_ids()) == 2, timeout=30, what="two deliveries by the worker process")

    def counted(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return scraped(web, "scrape-me").get(key, 0) - before.get(key, 0)

    wait_until(lambda: counted("postback_delivery_attempts_total", outcome="success") == 2, what="the worker's counts")
    assert counted("postback_delivery_duration_seconds_count") == 2
    assert counted("postback_ingested_total") == 2
    assert (BASE_DIR / "var" / "metrics").is_dir()


def test_a_metrics_folder_that_cannot_be_made_is_a_warning_and_the_process_runs_on(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = service_env(PROMETHEUS_MULTIPROC_DIR=str(blocker / "metrics"))

    checked = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )

    assert checked.returncode == 0, checked.stderr
    assert f"metrics folder {blocker / 'metrics'} unusable: it cannot be created" in checked.stderr
    assert "/metrics will not show them" in checked.stderr


def referenced_series(text: str) -> set[str]:
    return set(re.findall(r"\bpostback_[a-z_]+", text))


def test_alerts_and_the_grafana_dashboard_use_only_series_the_service_exports(client, token, receiver):
    ingest_json(client, {"endpoint": {"method": "GET", "url": receiver.url("/x")}, "data": [{}]})
    client.generic("POST", "/i", b"{")
    run_worker()
    exported = {name for name, _ in scrape(client, token)}
    exported |= {name.removesuffix("_total") for name in exported}  # PromQL may name the family

    for path in ("deploy/prometheus/alerts.yml", "deploy/grafana/postback.json"):
        used = referenced_series((BASE_DIR / path).read_text())
        assert used and used <= exported, (path, used - exported)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian's prometheus package provides promtool")
def test_the_alert_rules_are_valid_and_pass_their_unit_tests():
    rules = BASE_DIR / "deploy/prometheus"
    checked = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=rules, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=rules, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
