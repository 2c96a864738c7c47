"""The published ingest API: docs/openapi.yaml, served at /openapi.yaml, is valid OpenAPI 3.1,
states the limits the code enforces, and the service keeps to it: every status it answers,
headers and body as documented (checked by schemathesis), and schemathesis's generated requests
against the live service (gunicorn, with the suite's Redis) get no 5xx and nothing undocumented."""

import json
import re
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpResponse
from openapi_spec_validator import validate

from delivery.models import DeliverySettings
from ingestion import senders
from ingestion.validation import MAX_URL_LENGTH
from ingestion.views import OPENAPI_DOCUMENT
from postbackproject.postback import METHODS
from tests.conftest import http_answers, start_redis, use_redis, wait_until
from tests.test_ingestion import SAMPLE
from tests.test_senders import issue


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(OPENAPI_DOCUMENT.read_text())
    return loaded


@pytest.mark.django_db
def test_the_document_is_served_to_anyone_as_yaml_and_is_valid_openapi_3_1(client):
    response = client.get("/openapi.yaml")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/yaml"
    assert response.content == OPENAPI_DOCUMENT.read_bytes()
    served = yaml.safe_load(response.content)
    assert served["openapi"].startswith("3.1.")
    validate(served)
    assert set(served["paths"]) == {"/ingest.php", "/i"}
    assert client.post("/openapi.yaml").status_code == 405


def test_the_document_states_the_limits_the_code_enforces():
    schemas = document()["components"]["schemas"]
    assert schemas["IngestRequest"]["properties"]["data"]["maxItems"] == settings.INGEST_MAX_DATA_OBJECTS
    url = schemas["Endpoint"]["properties"]["url"]
    assert url["maxLength"] == MAX_URL_LENGTH
    template = re.compile(url["pattern"])
    assert template.fullmatch("HTTPs://h/{x}") and not template.fullmatch("ftp://h/")
    for code in [*range(0xD800), *range(0xE000, 0x10000)]:  # no white space or control character past these
        character = chr(code)
        refused = character.isspace() or code < 0x20 or code == 0x7F  # as ingestion refuses them
        assert (template.fullmatch(f"http://h/{character}") is None) == refused, hex(code)
    method = re.compile(schemas["Endpoint"]["properties"]["method"]["pattern"])
    for name in METHODS:
        assert method.fullmatch(name) and method.fullmatch(name.lower()) and method.fullmatch(name.title())
    assert not method.fullmatch("TRACE")
    assert not method.fullmatch("po\u017ft")  # the long s: Python's upper() makes it POST, the code refuses it

    limits = document()["info"]["description"]
    for value in (
        settings.INGEST_MAX_BODY_BYTES,
        settings.INGEST_MAX_DATA_OBJECTS,
        MAX_URL_LENGTH,
        settings.INGEST_MAX_PLACEHOLDERS,
        settings.INGEST_MAX_RENDERED_BYTES,
        settings.INGEST_MAX_QUEUED_JOBS,
        DeliverySettings._meta.get_field("max_url_bytes").default,
    ):
        assert f"| {value:,} |" in limits


# --- every status, as documented ------------------------------------------------------------


@cache
def api() -> schemathesis.BaseSchema:
    """The document as schemathesis reads it, checking answers as the live run below does, but
    for 503: here it is provoked, and the document lists it."""
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                "positive_data_acceptance": {"enabled": False},
                "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]},
            }
        }
    )
    return schemathesis.openapi.from_path(str(OPENAPI_DOCUMENT), config=config)


def assert_documented(response: HttpResponse, body: bytes, path: str = "/ingest.php") -> None:
    """The answer keeps to the document: its status is one the operation lists, with the
    headers, media type and body that status documents (schemathesis's checks)."""
    operation = api()[path]["POST"]
    try:
        sent_body: Any = json.loads(body)
    except ValueError:
        sent_body = body.decode()
    case = operation.Case(body=sent_body, media_type="application/json")
    sent = requests.Request("POST", f"http://testserver{path}", data=body).prepare()
    answer = schemathesis.Response(
        status_code=response.status_code,
        headers={name: [value] for name, value in response.items()},
        content=response.content,
        request=sent,
        elapsed=0.0,
        verify=True,
        message=response.reason_phrase,
    )
    case.validate_response(answer)


def post(client, body: bytes, path: str = "/ingest.php", **headers: str) -> HttpResponse:
    response: HttpResponse = client.generic("POST", path, body, **headers)
    assert_documented(response, body, path)
    return response


SAMPLE_BODY = json.dumps(SAMPLE).encode()


def accepted(client, settings, monkeypatch) -> HttpResponse:
    return post(client, SAMPLE_BODY, "/i")


def not_json(client, settings, monkeypatch) -> HttpResponse:
    return post(client, b"{not json")


def a_bad_field(client, settings, monkeypatch) -> HttpResponse:
    return post(client, json.dumps({**SAMPLE, "data": [{}, {}, {}, {"value": [1]}]}).encode())


def a_url_too_long_once_filled_in(client, settings, monkeypatch) -> HttpResponse:
    document = {"endpoint": {"method": "GET", "url": "http://h/{v}{v}{v}{v}"}, "data": [{"v": "\u00e9" * 2000}]}
    return post(client, json.dumps(document).encode())


def a_host_not_allowed(client, settings, monkeypatch) -> HttpResponse:
    return post(client, SAMPLE_BODY, HTTP_HOST="postbacks.example.net")


def a_wrong_key(client, settings, monkeypatch) -> HttpResponse:
    return post(client, SAMPLE_BODY, HTTP_AUTHORIZATION="Bearer pbk_not-a-key-of-ours")


def no_key_where_one_is_required(client, settings, monkeypatch) -> HttpResponse:
    settings.INGEST_REQUIRE_SENDER_KEY = True
    return post(client, SAMPLE_BODY)


def too_large(client, settings, monkeypatch) -> HttpResponse:
    return post(client, SAMPLE_BODY + b" " * settings.INGEST_MAX_BODY_BYTES)


def over_the_rate_limit(client, settings, monkeypatch) -> HttpResponse:
    _, key = issue(rate_limit=0.001)
    assert post(client, SAMPLE_BODY, HTTP_X_API_KEY=key).status_code == 202
    return post(client, SAMPLE_BODY, HTTP_X_API_KEY=key)


def the_backlog_full(client, settings, monkeypatch) -> HttpResponse:
    settings.INGEST_MAX_QUEUED_JOBS = 1
    assert post(client, SAMPLE_BODY).status_code == 202
    return post(client, SAMPLE_BODY)


def redis_down(client, settings, monkeypatch) -> HttpResponse:
    server = start_redis()
    use_redis(server.url)
    server.stop()
    return post(client, SAMPLE_BODY)


def the_keys_unreadable(client, settings, monkeypatch) -> HttpResponse:
    def unreadable() -> dict[str, senders.KnownKey]:
        raise DatabaseError("the database is down")

    monkeypatch.setattr(senders, "read_keys", unreadable)
    senders.KeyTable.forget()
    return post(client, SAMPLE_BODY, HTTP_X_API_KEY="pbk_whatever")


def plain_http_redirected_to_https(client, settings, monkeypatch) -> HttpResponse:
    settings.SECURE_SSL_REDIRECT = True
    return post(client, SAMPLE_BODY)


Scenario = Callable[[Any, Any, pytest.MonkeyPatch], HttpResponse]
SCENARIOS: list[tuple[Scenario, int]] = [
    (accepted, 202),
    (not_json, 400),
    (a_bad_field, 400),
    (a_url_too_long_once_filled_in, 400),
    (a_host_not_allowed, 400),
    (a_wrong_key, 401),
    (no_key_where_one_is_required, 401),
    (too_large, 413),
    (over_the_rate_limit, 429),
    (the_backlog_full, 503),
    (redis_down, 503),
    (the_keys_unreadable, 503),
    (plain_http_redirected_to_https, 301),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("scenario", "status"), SCENARIOS, ids=[scenario.__name__ for scenario, _ in SCENARIOS])
def test_every_status_is_answered_as_documented(client, settings, monkeypatch, scenario, status):
    assert scenario(client, settings, monkeypatch).status_code == status


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_get_the_documented_405(client, method):
    answer = document()["components"]["responses"]["MethodNotAllowed"]

    response = client.generic(method, "/i")

    assert response.status_code == 405
    assert response["Allow"] == answer["headers"]["Allow"]["schema"]["const"]
    assert response["Content-Type"] in answer["content"]
    if method != "HEAD":
        assert response.json() == answer["content"]["application/json"]["example"]


# --- the live service against the document ------------------------------------------------

# Cases per operation in the fuzzing phase; the examples and coverage phases add their own.
MAX_EXAMPLES = 60


@pytest.mark.django_db(transaction=True)  # the web process reads the suite's database
def test_every_answer_of_the_live_service_keeps_to_the_document(processes, tmp_path):
    """schemathesis's command line, every phase (the document's examples, its boundaries, then
    generated bodies valid and invalid) and every check: no 5xx, and each status, header, media
    type and body as documented; bodies the document refuses are refused; other methods get 405
    with Allow. Deterministic: the same cases every run.

    One check is left out: a body the document allows may still be refused with 400, since
    whether a URL's host is a valid name, and how long its URLs come to once filled in, are
    beyond JSON Schema (the document says so in words)."""
    base_url = processes.web(WEB_CONCURRENCY="2")
    wait_until(lambda: http_answers(f"{base_url}/healthz"), timeout=30, what="gunicorn to answer /healthz")

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{base_url}/openapi.yaml",
            "--checks=all",
            "--exclude-checks=positive_data_acceptance",
            f"--max-examples={MAX_EXAMPLES}",
            "--generation-deterministic",
            "--workers=1",
            "--no-color",
        ],
        cwd=tmp_path,  # no schemathesis.toml of anyone's
        capture_output=True,
        text=True,
        timeout=100,
    )

    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
    assert "Tested: 2" in run.stdout and "No issues found" in run.stdout
