"""The ingestion endpoint: validation, status codes and what lands in the queue."""

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.connection import Connection

from delivery.models import DeliverySettings
from ingestion.checks import check_ingestion_limits
from postbackproject import keys
from postbackproject.queue import get_connection, get_queue
from tests.conftest import ingest_json, start_redis, use_redis

SAMPLE: dict[str, Any] = {
    "endpoint": {"method": "GET", "url": "http://sample_domain_endpoint.com/data?key={key}&value={value}&foo={bar}"},
    "data": [{"key": "Azureus", "value": "Dendrobates"}, {"key": "Phyllobates", "value": "Terribilis"}],
}

pytestmark = pytest.mark.django_db


def inbox_entries() -> list[list[Any]]:
    """The request entries in the inbox: [request id, first index, method, URL, [objects]]."""
    entries: Any = get_connection().xrange(keys.INBOX)
    assert all(fields.keys() == {b"r"} for _, fields in entries)
    return [json.loads(fields[b"r"]) for _, fields in entries]


def raw_entries() -> list[bytes]:
    entries: Any = get_connection().xrange(keys.INBOX)
    return [fields[b"r"] for _, fields in entries]


@pytest.mark.parametrize("path", ["/ingest.php", "/i"])
def test_it_accepts_the_sample_as_one_inbox_entry(client, path):
    response = ingest_json(client, SAMPLE, path)

    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == 2
    assert len(body["postbacks"]) == 2 and len(set(body["postbacks"])) == 2
    [[request_id, first, method, url, objects, sender]] = inbox_entries()
    assert (first, method, url, sender) == (0, "GET", SAMPLE["endpoint"]["url"], "127.0.0.1")
    assert body["postbacks"] == [f"{request_id}-0", f"{request_id}-1"]
    assert objects == SAMPLE["data"]


def test_the_first_request_starts_a_drainer_and_the_next_ones_do_not(client):
    ingest_json(client, SAMPLE)
    ingest_json(client, SAMPLE)

    [job] = get_queue().jobs
    assert job.func_name == "delivery.jobs.drain"
    assert job.result_ttl == 0
    assert get_connection().zscore(keys.LEASES, job.id) is not None


def test_the_sample_costs_one_round_trip_to_redis(client, monkeypatch, settings):
    settings.INGEST_BACKLOG_CHECK_SECONDS = 60  # Redis's memory use is read once a while, not per request
    ingest_json(client, SAMPLE)  # the first starts a drainer (and loads the script)
    sent: list[bytes] = []
    original = Connection.send_packed_command

    def counting(self: Connection, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else command)
        original(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting)

    ingest_json(client, SAMPLE)

    assert len(sent) == 1 and b"EVALSHA" in sent[0]


def test_it_needs_no_content_type_and_takes_any(client):
    raw = json.dumps(SAMPLE)
    assert client.generic("POST", "/i", raw, content_type="").status_code == 202
    assert client.post("/i", raw, content_type="application/x-www-form-urlencoded").status_code == 202
    assert client.post("/i", raw, content_type="text/plain").status_code == 202


def test_method_is_case_insensitive_and_stored_upper(client):
    document = {**SAMPLE, "endpoint": {**SAMPLE["endpoint"], "method": "post"}}
    assert ingest_json(client, document).status_code == 202
    assert inbox_entries()[0][2] == "POST"


def test_numbers_travel_as_written(client):
    raw = b'{"endpoint":{"method":"GET","url":"http://h/?a={a}"},"data":[{"a":1.50,"b":1e5,"c":true,"d":null}]}'
    assert client.generic("POST", "/i", raw).status_code == 202
    assert raw_entries()[0].endswith(b',[{"a":1.50,"b":1e5,"c":true,"d":null}],"127.0.0.1"]')


def test_large_requests_are_split_into_entries_of_batch_size(client):
    DeliverySettings(batch_size=3).save()
    document = {**SAMPLE, "data": [{"key": str(n)} for n in range(7)]}

    response = ingest_json(client, document)

    assert response.status_code == 202
    entries = inbox_entries()
    assert [(first, len(objects)) for _, first, _, _, objects, _ in entries] == [(0, 3), (3, 3), (6, 1)]
    carried = [f"{rid}-{first + n}" for rid, first, _, _, objects, _ in entries for n in range(len(objects))]
    assert carried == response.json()["postbacks"]


BAD_BODIES = [
    (b"", None, "empty"),
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe", None, "not UTF-8"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"data": [{"a": 1}]}', "endpoint", "object"),
    (b'{"endpoint": {"method": "GET", "url": "http://h/"}, "data": [{"a": NaN}]}', None, "not valid JSON"),
    (b'{"endpoint": {"method": "TRACE", "url": "http://h/"}, "data": [{}]}', "endpoint.method", "must be one of"),
    (b'{"endpoint": {"method": 1, "url": "http://h/"}, "data": [{}]}', "endpoint.method", "must be one of"),
    (b'{"endpoint": {"method": "po\\u017ft", "url": "http://h/"}, "data": [{}]}', "endpoint.method", "must be one of"),
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
    assert not get_connection().exists(keys.INBOX)


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
    assert not get_connection().exists(keys.INBOX)


def test_too_many_data_objects_get_400(client, settings):
    settings.INGEST_MAX_DATA_OBJECTS = 2
    response = ingest_json(client, {**SAMPLE, "data": [{}, {}, {}]})
    assert response.status_code == 400
    assert response.json()["field"] == "data"


@pytest.mark.parametrize("name", ["INGEST_MAX_PLACEHOLDERS", "INGEST_MAX_RENDERED_BYTES"])
def test_a_limit_of_zero_work_is_a_configuration_error(settings, name):
    setattr(settings, name, 0)

    [error] = check_ingestion_limits(None)
    assert error.id == "ingestion.E001" and name in error.msg


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
    assert int(response["Retry-After"]) > 0
    assert "backlog" in response.json()["error"]
    assert len(inbox_entries()) == 2


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


def request_lines(caplog) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "ingestion.requests"]


def test_each_request_is_one_json_log_line_with_its_postback_ids(client, caplog, settings):
    settings.TRUSTED_PROXIES = ["127.0.0.1/32"]  # nginx, as postback-web.service lists it
    with caplog.at_level("INFO", logger="ingestion.requests"):
        ids = ingest_json(client, SAMPLE).json()["postbacks"]
        client.generic("POST", "/i", b"{not json", REMOTE_ADDR="127.0.0.1", HTTP_X_REAL_IP="203.0.113.9")

    accepted, refused = request_lines(caplog)
    assert accepted["event"] == "ingest" and accepted["status"] == 202
    assert accepted["accepted"] == 2 and accepted["postback_ids"] == ids
    assert accepted["path"] == "/ingest.php" and accepted["duration_ms"] >= 0
    assert accepted["client"] == "127.0.0.1"
    assert refused["status"] == 400 and "not valid JSON" in refused["error"]
    assert refused["client"] == "203.0.113.9"  # nginx's X-Real-IP, from a trusted proxy


def test_a_large_requests_log_line_lists_the_first_ids_and_says_so(client, caplog):
    with caplog.at_level("INFO", logger="ingestion.requests"):
        ingest_json(client, {**SAMPLE, "data": [{}] * 150})

    [line] = request_lines(caplog)
    assert line["accepted"] == 150
    assert len(line["postback_ids"]) == 100 and line["postback_ids_truncated"] is True
    assert line["postback_ids"][0] == f"{line['request_id']}-0"


def test_log_format_json_makes_every_log_line_one_json_object(processes):
    """A real worker with LOG_FORMAT=json: RQ's own messages come out as JSON objects."""
    worker = processes.run(["manage.py", "rqworker", "postbacks", "--burst"], LOG_FORMAT="json")
    assert worker.wait(timeout=60) == 0
    lines = processes.output().splitlines()
    assert any('"logger": "rq.worker"' in line for line in lines), lines
    assert all({"time", "level", "logger", "message"} <= json.loads(line).keys() for line in lines)
