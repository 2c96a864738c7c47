"""The ingestion endpoint: validation, status codes and what lands in the queue."""

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rq.job import Job

from delivery.models import DeliverySettings
from postbackproject.queue import get_connection, get_queue
from tests.conftest import ingest_json, start_redis, use_redis

SAMPLE: dict[str, Any] = {
    "endpoint": {"method": "GET", "url": "http://sample_domain_endpoint.com/data?key={key}&value={value}&foo={bar}"},
    "data": [{"key": "Azureus", "value": "Dendrobates"}, {"key": "Phyllobates", "value": "Terribilis"}],
}

pytestmark = pytest.mark.django_db


def queued_jobs() -> list[Job]:
    queue = get_queue()
    return [Job.fetch(job_id, connection=get_connection(), serializer=queue.serializer) for job_id in queue.job_ids]


@pytest.mark.parametrize("path", ["/ingest.php", "/i"])
def test_it_accepts_the_sample_as_one_job(client, path):
    response = ingest_json(client, SAMPLE, path)

    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == 2
    assert len(body["postbacks"]) == 2 and len(set(body["postbacks"])) == 2
    [job] = queued_jobs()
    batch = job.args[0]
    assert batch["method"] == "GET"
    assert batch["url"] == SAMPLE["endpoint"]["url"]
    assert [pid for pid, _ in batch["postbacks"]] == body["postbacks"]
    assert [json.loads(text) for _, text in batch["postbacks"]] == SAMPLE["data"]
    assert job.func_name == "delivery.jobs.deliver_batch"
    assert job.result_ttl == 0


def test_it_needs_no_content_type_and_takes_any(client):
    raw = json.dumps(SAMPLE)
    assert client.generic("POST", "/i", raw, content_type="").status_code == 202
    assert client.post("/i", raw, content_type="application/x-www-form-urlencoded").status_code == 202
    assert client.post("/i", raw, content_type="text/plain").status_code == 202


def test_method_is_case_insensitive_and_stored_upper(client):
    document = {**SAMPLE, "endpoint": {**SAMPLE["endpoint"], "method": "post"}}
    assert ingest_json(client, document).status_code == 202
    assert queued_jobs()[0].args[0]["method"] == "POST"


def test_numbers_travel_as_written(client):
    raw = b'{"endpoint":{"method":"GET","url":"http://h/?a={a}"},"data":[{"a":1.50,"b":1e5,"c":true,"d":null}]}'
    assert client.generic("POST", "/i", raw).status_code == 202
    assert queued_jobs()[0].args[0]["postbacks"][0][1] == '{"a":1.50,"b":1e5,"c":true,"d":null}'


def test_large_requests_are_split_into_batches(client):
    DeliverySettings(batch_size=3).save()
    document = {**SAMPLE, "data": [{"key": str(n)} for n in range(7)]}

    response = ingest_json(client, document)

    assert response.status_code == 202
    sizes = sorted(len(job.args[0]["postbacks"]) for job in queued_jobs())
    assert sizes == [1, 3, 3]
    carried = [pid for job in queued_jobs() for pid, _ in job.args[0]["postbacks"]]
    assert sorted(carried) == sorted(response.json()["postbacks"])


BAD_BODIES = [
    (b"", None, "empty"),
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe", None, "not UTF-8"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"data": [{"a": 1}]}', "endpoint", "object"),
    (b'{"endpoint": {"method": "GET", "url": "http://h/"}, "data": [{"a": NaN}]}', None, "not valid JSON"),
    (b'{"endpoint": {"method": "TRACE", "url": "http://h/"}, "data": [{}]}', "endpoint.method", "must be one of"),
    (b'{"endpoint": {"method": 1, "url": "http://h/"}, "data": [{}]}', "endpoint.method", "must be one of"),
    (b'{"endpoint": {"method": "GET"}, "data": [{}]}', "endpoint.url", "non-empty string"),
    (b'{"endpoint": {"method": "GET", "url": "ftp://h/x"}, "data": [{}]}', "endpoint.url", "http"),
    (b'{"endpoint": {"method": "GET", "url": "/relative"}, "data": [{}]}', "endpoint.url", "http"),
    (b'{"endpoint": {"method": "GET", "url": "http:///nohost"}, "data": [{}]}', "endpoint.url", "host"),
    (b'{"endpoint": {"method": "GET", "url": "http://h/a b"}, "data": [{}]}', "endpoint.url", "spaces"),
    (b'{"endpoint": {"method": "GET", "url": "http://h/"}}', "data", "non-empty list"),
    (b'{"endpoint": {"method": "GET", "url": "http://h/"}, "data": []}', "data", "non-empty list"),
    (b'{"endpoint": {"method": "GET", "url": "http://h/"}, "data": {"a": 1}}', "data", "non-empty list"),
    (b'{"endpoint": {"method": "GET", "url": "http://h/"}, "data": [{}, 3]}', "data[1]", "object"),
    (
        b'{"endpoint": {"method": "GET", "url": "http://h/"}, "data": [{}, {}, {}, {"value": [1]}]}',
        "data[3].value",
        "must be a string, number, boolean or null",
    ),
    (b'{"endpoint": {"method": "GET", "url": "http://h/"}, "data": [{"a": "\\ud800"}]}', "data[0]", "surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, None, "nested"),
]


@pytest.mark.parametrize(("body", "field", "words"), BAD_BODIES)
def test_bad_input_gets_a_400_naming_the_field(client, body, field, words):
    response = client.generic("POST", "/ingest.php", body)

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert words in response.json()["error"]
    assert response.json()["field"] == field
    assert get_queue().count == 0


def test_the_error_names_the_field_as_the_contract_shows(client):
    document = {**SAMPLE, "data": [{}, {}, {}, {"value": {"x": 1}}]}
    response = ingest_json(client, document)
    assert response.json()["error"] == "data[3].value: must be a string, number, boolean or null"


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_other_methods_get_405_with_allow(client, method):
    response = getattr(client, method)("/ingest.php")
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert "error" in response.json()


def test_too_large_bodies_get_413(client, settings):
    settings.INGEST_MAX_BODY_BYTES = 100
    response = ingest_json(client, {**SAMPLE, "pad": "x" * 200})
    assert response.status_code == 413
    assert "error" in response.json()
    assert get_queue().count == 0


def test_too_many_data_objects_get_400(client, settings):
    settings.INGEST_MAX_DATA_OBJECTS = 2
    response = ingest_json(client, {**SAMPLE, "data": [{}, {}, {}]})
    assert response.status_code == 400
    assert response.json()["field"] == "data"


def test_redis_down_gets_503_with_retry_after(client):
    server = start_redis()
    use_redis(server.url)
    server.stop()

    response = ingest_json(client, SAMPLE)

    assert response.status_code == 503
    assert int(response["Retry-After"]) > 0
    assert "queue unavailable" in response.json()["error"]


def test_a_full_backlog_gets_503(client, settings):
    settings.INGEST_MAX_QUEUED_JOBS = 2
    assert ingest_json(client, SAMPLE).status_code == 202
    assert ingest_json(client, SAMPLE).status_code == 202

    response = ingest_json(client, SAMPLE)

    assert response.status_code == 503
    assert "backlog" in response.json()["error"]
    assert get_queue().count == 2


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
ENDPOINTS = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "post", "TRACE", ""]) | JSON_VALUES,
        "url": st.just("http://h/{k}") | JSON_VALUES,
    }
)
DOCUMENTS = st.fixed_dictionaries({"endpoint": ENDPOINTS | JSON_VALUES, "data": JSON_VALUES}) | JSON_VALUES


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=DOCUMENTS)
def test_no_json_document_gets_a_500(client, document):
    response = ingest_json(client, document)
    assert response.status_code in (202, 400)
    assert ("error" in response.json()) == (response.status_code == 400)


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200))
def test_no_byte_string_gets_a_500(client, body):
    assert client.generic("POST", "/i", body).status_code in (202, 400)
