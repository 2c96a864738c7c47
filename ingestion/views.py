"""The ingestion endpoint: one validated request in, appended to the inbox in one round trip, 202."""

import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe
from redis.exceptions import RedisError

from delivery.models import DeliverySettings
from ingestion import senders
from ingestion.body import read_body
from ingestion.clients import client_address
from ingestion.validation import InvalidRequest, Limits, parse_body
from postbackproject import tracing
from postbackproject.inbox import BacklogFull, NotReplicated, append_request, postback_id, request_entries
from postbackproject.metrics import INGEST_REJECTED, INGESTED
from postbackproject.queue import memory_gauge

logger = logging.getLogger(__name__)
# One JSON line per request: the record of what was accepted or refused, and why.
request_log = logging.getLogger("ingestion.requests")
# Postback ids listed in a request's log line; a larger request lists these and says how many.
LOGGED_IDS = 100

# Seconds a sender should wait before trying again after a 503.
RETRY_AFTER_SECONDS = 5

# The ingest API as senders read it (OpenAPI 3.1), served at /openapi.yaml.
OPENAPI_DOCUMENT = settings.BASE_DIR / "docs" / "openapi.yaml"


@dataclass(frozen=True)
class Answer:
    """What ingestion answers, and what its log line says about it."""

    response: HttpResponse
    log: dict[str, object]
    accepted: int = 0  # postbacks taken in
    request_id: str = ""  # when taken in
    sender: str = ""


def error(status: int, message: str, **extra: object) -> Answer:
    return Answer(JsonResponse({"error": message, **extra}, status=status), {"error": message})


def unavailable(message: str) -> Answer:
    answer = error(503, message)
    answer.response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return answer


def refused(exc: senders.Refused) -> Answer:
    answer = error(exc.status, str(exc))
    for name, value in exc.headers.items():
        answer.response[name] = value
    return answer


def accepted(request_id: str, count: int, sender: str = "") -> Answer:
    """202 `{"accepted": N, "postbacks": [ids]}`, written directly: the ids need no escaping."""
    ids = [postback_id(request_id, index) for index in range(count)]
    quoted = ",".join(f'"{pid}"' for pid in ids)
    body = f'{{"accepted": {count}, "postbacks": [{quoted}]}}'
    log: dict[str, object] = {"accepted": count, "request_id": request_id, "postback_ids": ids[:LOGGED_IDS]}
    if count > LOGGED_IDS:
        log["postback_ids_truncated"] = True
    response = HttpResponse(body, status=202, content_type="application/json")
    return Answer(response, log, accepted=count, request_id=request_id, sender=sender)


@csrf_exempt
def ingest(request: HttpRequest) -> HttpResponse:
    """POST /ingest.php and /i: the body is raw JSON, whatever the Content-Type says."""
    started = time.perf_counter()
    span = tracing.start_ingest(request)  # None while traces are off
    try:
        answer = take(request, tracing.traceparent(span))
    except Exception as exc:  # answered 500 by Django's handler: the span says so too
        if span is not None:
            tracing.end_ingest(span, 500, "", 0, "", exc)
        raise
    log_request(request, answer, time.perf_counter() - started)
    count_request(answer)
    if span is not None:
        tracing.end_ingest(span, answer.response.status_code, answer.request_id, answer.accepted, answer.sender)
    return answer.response


def take(request: HttpRequest, traceparent: str = "") -> Answer:
    """Validate the request and append it to the inbox (with the trace its postbacks continue,
    if any), or say why not."""
    if request.method != "POST":
        answer = error(405, "use POST with a raw JSON body")
        answer.response["Allow"] = "POST"
        return answer
    try:
        admission = senders.admit(request, client_address(request))
    except senders.Refused as exc:
        return refused(exc)

    body = read_body(request, settings.INGEST_MAX_BODY_BYTES)
    if body is None:
        return error(413, f"body is larger than {settings.INGEST_MAX_BODY_BYTES} bytes")
    config = delivery_settings()
    limits = Limits(
        settings.INGEST_MAX_DATA_OBJECTS,
        config.max_url_bytes,
        config.unmatched_default,
        settings.INGEST_MAX_PLACEHOLDERS,
        settings.INGEST_MAX_RENDERED_BYTES,
    )
    try:
        parsed = parse_body(body, limits)
    except InvalidRequest as exc:
        return error(400, str(exc), field=exc.field)

    request_id = uuid.uuid4().hex
    entries = request_entries(
        request_id, parsed.method, parsed.url, parsed.data_texts, config.batch_size, admission.sender, parsed.headers
    )
    try:
        if (reason := memory_gauge.full_reason(adding=sum(len(entry.encode()) for entry in entries))) is not None:
            return unavailable(reason)
        append_request(entries, len(parsed.data_texts), admission.rate_limits, traceparent)
    except senders.RateLimited as exc:
        return refused(senders.too_many(exc))
    except BacklogFull:
        return unavailable("delivery backlog is full, nothing was accepted")
    except NotReplicated as exc:
        # Refusing risks a duplicate when the sender sends again; a 202 would risk a loss.
        logger.error("ingest not confirmed by replicas: %s", exc)
        return unavailable("queue storage could not confirm the request; send it again")
    except RedisError as exc:
        logger.error("queue unavailable: %s", exc)
        return unavailable("queue unavailable, nothing was accepted")
    return accepted(request_id, len(parsed.data_texts), admission.sender)


def log_request(request: HttpRequest, answer: Answer, seconds: float) -> None:
    """One JSON line per request: status, postbacks accepted and their ids, or the error, how
    long it took, and who sent it."""
    line = {
        "event": "ingest",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "path": request.path,
        "status": answer.response.status_code,
        "duration_ms": round(seconds * 1000, 2),
        "client": client_address(request),
        **senders.log_fields(request),
        **answer.log,
    }
    request_log.info(json_line(line))


def json_line(fields: Mapping[str, object]) -> str:
    """The fields as one line of JSON, by orjson (5.3 µs -> 0.4 µs for an ingest's line); by
    the standard library for what orjson refuses (a lone surrogate a sender wrote as \\ud800)."""
    try:
        return orjson.dumps(fields).decode()
    except orjson.JSONEncodeError:
        return json.dumps(fields, ensure_ascii=False)


def count_request(answer: Answer) -> None:
    status = answer.response.status_code
    if status == 202:
        INGESTED.inc(answer.accepted)
    else:
        INGEST_REJECTED.labels(str(status)).inc()


def delivery_settings() -> DeliverySettings:
    """Settings for checking URLs and cutting batches: readable while the database is down
    (the last ones read, or the defaults), so ingestion keeps accepting."""
    return DeliverySettings.current()


@require_safe
def openapi(request: HttpRequest) -> HttpResponse:
    """GET /openapi.yaml: the ingest API's OpenAPI document, to anyone (it says what the
    senders' URLs accept and answer, nothing more)."""
    return HttpResponse(openapi_document(), content_type="application/yaml")


@cache
def openapi_document() -> bytes:
    """docs/openapi.yaml, read once per process."""
    return OPENAPI_DOCUMENT.read_bytes()
