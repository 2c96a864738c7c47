"""Traces: spans for ingest requests and delivery attempts, read from the SDK's in-memory
exporter, with real ingest requests, real workers and a real receiver."""

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from django.conf import settings
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from delivery.entries import read_entry
from delivery.models import DeliverySettings
from postbackproject import inbox, keys, tracing
from postbackproject.postback import Try
from postbackproject.queue import get_connection
from tests.conftest import Reply, deliver_everything, ingest_json, run_worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def spans():
    """Every span this process makes, kept in memory; traces off again afterwards."""
    exporter = InMemorySpanExporter()
    tracing.use_exporter(exporter)
    yield exporter
    tracing.reset()


def postback(receiver, path: str = "/hook", count: int = 1) -> dict[str, object]:
    return {"endpoint": {"method": "GET", "url": receiver.url(path)}, "data": [{} for _ in range(count)]}


def traceparent_of(span: ReadableSpan) -> str:
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-{int(span.context.trace_flags):02x}"


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def inbox_fields() -> list[dict[bytes, bytes]]:
    """The fields of each entry in the inbox."""
    entries: Any = get_connection().xrange(keys.INBOX)
    return [fields for _, fields in entries]


def waiting_tries() -> list[Any]:
    """The tries waiting for their time, as the JSON in Redis."""
    texts: Any = get_connection().hvals(keys.DUE_TRIES)
    return [json.loads(text) for text in texts]


def by_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind is kind]


def attempt_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return sorted(by_kind(exporter, SpanKind.CLIENT), key=lambda span: attributes(span)["postback.attempt"])


def assert_child_and_linked(span: ReadableSpan, ingest: ReadableSpan) -> None:
    assert span.context.trace_id == ingest.context.trace_id
    assert span.parent is not None and span.parent.span_id == ingest.context.span_id
    assert [link.context.span_id for link in span.links] == [ingest.context.span_id]
    assert [link.context.trace_id for link in span.links] == [ingest.context.trace_id]


@pytest.mark.parametrize("path", ["/ingest.php", "/i"])
def test_an_ingest_request_is_a_server_span_whose_trace_travels_in_the_inbox_entry(client, receiver, spans, path):
    response = ingest_json(client, postback(receiver, count=2), path)

    [ingest] = spans.get_finished_spans()
    request_id = response.json()["postbacks"][0].rsplit("-", 1)[0]
    assert ingest.kind is SpanKind.SERVER
    assert ingest.name == f"POST {path}"
    assert attributes(ingest) == {
        "http.request.method": "POST",
        "http.route": path,
        "url.path": path,
        "http.response.status_code": 202,
        "postback.count": 2,
        "postback.request_id": request_id,
        "postback.sender": "127.0.0.1",
    }
    assert ingest.status.status_code is StatusCode.UNSET
    assert ingest.resource.attributes["service.name"] == "postback-delivery"
    [fields] = inbox_fields()
    assert fields[b"tp"].decode() == traceparent_of(ingest)


def test_a_refused_request_is_a_span_with_its_status_and_no_error(client, spans):
    response = client.generic("POST", "/ingest.php", b"{not json")

    [ingest] = spans.get_finished_spans()
    assert response.status_code == 400
    assert attributes(ingest)["http.response.status_code"] == 400
    assert attributes(ingest)["postback.count"] == 0
    assert "postback.request_id" not in attributes(ingest)
    assert ingest.status.status_code is StatusCode.UNSET


def test_a_request_that_breaks_the_view_is_an_error_span(client, receiver, spans, monkeypatch):
    def broken(*args: object) -> None:
        raise RuntimeError("the inbox is on fire")

    monkeypatch.setattr("ingestion.views.append_request", broken)
    client.raise_request_exception = False
    response = ingest_json(client, postback(receiver))

    [ingest] = spans.get_finished_spans()
    assert response.status_code == 500
    assert attributes(ingest)["http.response.status_code"] == 500
    assert ingest.status.status_code is StatusCode.ERROR
    assert [event.name for event in ingest.events] == ["exception"]


def test_a_sender_s_traceparent_is_continued(client, receiver, spans):
    sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    client.generic("POST", "/i", json.dumps(postback(receiver)).encode(), HTTP_TRACEPARENT=sent)

    [ingest] = spans.get_finished_spans()
    assert f"{ingest.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert ingest.parent is not None and f"{ingest.parent.span_id:016x}" == "b7ad6b7169203331"


def test_a_delivery_attempt_is_a_client_span_child_of_the_ingest_span_and_linked_to_it(client, receiver, spans):
    [pid] = ingest_json(client, postback(receiver)).json()["postbacks"]

    run_worker()

    [ingest] = by_kind(spans, SpanKind.SERVER)
    [attempt] = attempt_spans(spans)
    assert_child_and_linked(attempt, ingest)
    assert attempt.name == "deliver GET"
    found = attributes(attempt)
    assert found.pop("postback.latency_ms") >= 0
    assert found == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": receiver.port,
        "postback.id": pid,
        "postback.attempt": 1,
        "postback.outcome": "success",
        "http.response.status_code": 200,
    }
    assert attempt.status.status_code is StatusCode.UNSET
    assert attempt.start_time is not None and attempt.end_time is not None
    assert attempt.start_time <= attempt.end_time
    assert "traceparent" not in {name.lower() for name in receiver.requests[0].headers}  # send_traceparent is off


def test_receivers_get_the_attempt_span_s_traceparent_when_send_traceparent_is_on(client, receiver, spans):
    DeliverySettings(send_traceparent=True).save()
    ingest_json(client, postback(receiver, count=2))

    run_worker()

    attempts = attempt_spans(spans)
    sent = sorted(request.headers["traceparent"] for request in receiver.requests)
    assert sent == sorted(traceparent_of(span) for span in attempts)
    assert len(set(sent)) == 2  # each attempt its own span, in the one trace
    assert len({span.context.trace_id for span in spans.get_finished_spans()}) == 1


def test_retries_are_one_span_each_all_in_the_ingest_trace(client, receiver, spans):
    DeliverySettings(send_traceparent=True).save()
    receiver.answer(Reply(500), Reply(503), Reply(200))
    ingest_json(client, postback(receiver))

    run_worker()
    # The retry waits in Redis (until deliver_everything makes it due) as a nine-field try:
    # sender, headers (none here), traceparent.
    [ingest] = by_kind(spans, SpanKind.SERVER)
    [waiting] = waiting_tries()
    assert waiting[6:] == ["127.0.0.1", {}, traceparent_of(ingest)]
    deliver_everything()

    attempts = attempt_spans(spans)
    assert [attributes(span)["postback.attempt"] for span in attempts] == [1, 2, 3]
    assert [attributes(span)["http.response.status_code"] for span in attempts] == [500, 503, 200]
    assert [attributes(span)["postback.outcome"] for span in attempts] == ["retry", "retry", "success"]
    assert [span.status.status_code for span in attempts] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    for span in attempts:
        assert_child_and_linked(span, ingest)
    assert [request.headers["traceparent"] for request in receiver.requests] == [traceparent_of(s) for s in attempts]


def test_a_failed_attempt_is_an_error_span(client, receiver, spans):
    receiver.answer(Reply(404))
    ingest_json(client, postback(receiver))

    run_worker()

    [attempt] = attempt_spans(spans)
    assert attributes(attempt)["postback.outcome"] == "failed"
    assert attributes(attempt)["http.response.status_code"] == 404
    assert attributes(attempt)["error.type"] == "404"
    assert attempt.status.status_code is StatusCode.ERROR


def test_tries_deferred_by_an_open_circuit_are_spans_of_their_own_in_the_ingest_trace(client, receiver, spans):
    DeliverySettings(circuit_failure_threshold=1, max_in_flight_per_host=1).save()
    receiver.default = Reply(503)
    ingest_json(client, postback(receiver, count=3))

    run_worker()

    [ingest] = by_kind(spans, SpanKind.SERVER)
    attempts = by_kind(spans, SpanKind.CLIENT)
    outcomes = sorted(attributes(span)["postback.outcome"] for span in attempts)
    assert outcomes == ["deferred", "deferred", "retry"]  # the circuit opened after the first failure
    for span in attempts:
        assert_child_and_linked(span, ingest)
    deferred = [span for span in attempts if attributes(span)["postback.outcome"] == "deferred"]
    assert all("http.response.status_code" not in attributes(span) for span in deferred)
    assert all(span.status.status_code is StatusCode.UNSET for span in deferred)


def test_traces_are_off_by_default(client, receiver, settings):
    settings.OTEL_TRACES = False
    tracing.reset()
    receiver.answer(Reply(500))
    ingest_json(client, postback(receiver))
    [fields] = inbox_fields()
    DeliverySettings(send_traceparent=True).save()  # nothing to send without traces

    run_worker()

    assert tracing.tracer() is None and tracing.provider() is None
    assert list(fields) == [b"r"]
    [waiting] = waiting_tries()
    assert len(waiting) == 7  # as before traces: the sender last
    assert "traceparent" not in {name.lower() for name in receiver.requests[0].headers}


def test_without_an_endpoint_the_trace_sdk_and_exporter_are_not_loaded():
    # (redis-py imports OpenTelemetry's metrics SDK whenever it is installed, for its own metrics,
    # which stay off: not ours to count here.)
    environment = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    environment["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    code = (
        "import sys, django; django.setup(); "
        "import postbackproject.wsgi, ingestion.views, delivery.worker, delivery.settling; "
        "from postbackproject import tracing; assert tracing.tracer() is None; "
        "print(sorted(name for name in sys.modules if name.startswith(("
        "'opentelemetry.sdk.trace', 'opentelemetry.exporter'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=environment, cwd=settings.BASE_DIR, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- the shapes that carry a trace -------------------------------------------------------

OLD_SIX = ["p-0", 1, 0, "GET", "http://x/", None]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("fields", "sender", "traceparent"),
    [
        (OLD_SIX, "", ""),
        ([*OLD_SIX, "key 3"], "key 3", ""),
        ([*OLD_SIX, "key 3", {"X-Other": "kept elsewhere"}], "key 3", ""),
        ([*OLD_SIX, "", {}, TRACEPARENT], "", TRACEPARENT),
    ],
)
def test_tries_of_six_to_nine_fields_are_read(fields, sender, traceparent):
    item = Try.from_fields(fields)

    assert (item.postback_id, item.sender, item.traceparent) == ("p-0", sender, traceparent)


@pytest.mark.parametrize(
    "fields",
    [[*OLD_SIX, "key 3", "not an object"], [*OLD_SIX, "", {}, 7], [*OLD_SIX, "", {}, TRACEPARENT, "tenth"]],
)
def test_tries_of_other_shapes_are_refused(fields):
    with pytest.raises(ValueError):
        Try.from_fields(fields)


def test_a_traced_try_is_written_with_nine_fields_and_read_back():
    item = Try("p-0", 2, 0, "POST", "http://x/", "{}", traceparent=TRACEPARENT)

    assert json.loads(item.to_json())[6:] == ["", {}, TRACEPARENT]
    assert Try.from_fields(json.loads(item.to_json())) == item
    assert len(json.loads(Try("p-0", 2, 0, "GET", "http://x/", None, "key 3").to_json())) == 7


def test_a_request_entry_s_traceparent_reaches_its_tries():
    payload = inbox.request_entries("r1", "GET", "http://x/{a}", ['{"a":1}'], 100)[0].encode()
    reply = [[b"1-0", [b"r", payload, b"tp", TRACEPARENT.encode(), b"later", b"ignored"]], [b"1-1", {b"r": payload}]]

    traced, untraced = inbox.entries_from_reply(reply)

    assert (traced.kind, traced.traceparent, untraced.traceparent) == ("r", TRACEPARENT, "")
    config = DeliverySettings()
    [item] = read_entry(traced).take(config, 1.0).tries
    assert item.traceparent == TRACEPARENT
    [old] = read_entry(untraced).take(config, 1.0).tries
    assert old.traceparent == ""
