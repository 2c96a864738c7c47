"""The ingestion endpoint: one validated request in, appended to the inbox in one round trip, 202."""

import logging
import uuid

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError

from delivery.models import DeliverySettings
from ingestion.validation import InvalidRequest, parse_body
from postbackproject.inbox import BacklogFull, append_request, postback_id, request_entries
from postbackproject.queue import memory_gauge

logger = logging.getLogger(__name__)

# Seconds a sender should wait before trying again after a 503.
RETRY_AFTER_SECONDS = 5


def error(status: int, message: str, **extra: object) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)


def unavailable(message: str) -> JsonResponse:
    response = error(503, message)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


@csrf_exempt
def ingest(request: HttpRequest) -> HttpResponse:
    """POST /ingest.php and /i: the body is raw JSON, whatever the Content-Type says."""
    if request.method != "POST":
        response = error(405, "use POST with a raw JSON body")
        response["Allow"] = "POST"
        return response

    body = read_body(request, settings.INGEST_MAX_BODY_BYTES)
    if body is None:
        return error(413, f"body is larger than {settings.INGEST_MAX_BODY_BYTES} bytes")
    try:
        parsed = parse_body(body, settings.INGEST_MAX_DATA_OBJECTS)
    except InvalidRequest as exc:
        return error(400, str(exc), field=exc.field)

    request_id = uuid.uuid4().hex
    entries = request_entries(request_id, parsed.method, parsed.url, parsed.data_texts, batching_settings().batch_size)
    try:
        if (reason := memory_gauge.full_reason()) is not None:
            return unavailable(reason)
        append_request(entries, len(parsed.data_texts))
    except BacklogFull:
        return unavailable("delivery backlog is full, nothing was accepted")
    except RedisError as exc:
        logger.error("queue unavailable: %s", exc)
        return unavailable("queue unavailable, nothing was accepted")
    return accepted(request_id, len(parsed.data_texts))


def accepted(request_id: str, count: int) -> HttpResponse:
    """202 `{"accepted": N, "postbacks": [ids]}`, written directly: the ids need no escaping."""
    ids = ",".join(f'"{postback_id(request_id, index)}"' for index in range(count))
    body = f'{{"accepted": {count}, "postbacks": [{ids}]}}'
    return HttpResponse(body, status=202, content_type="application/json")


def read_body(request: HttpRequest, limit: int) -> bytes | None:
    """The body, or None when it is over the limit (read no further than limit + 1 bytes)."""
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        return None
    body = request.read(limit + 1)
    return None if len(body) > limit else body


def batching_settings() -> DeliverySettings:
    """Settings for cutting batches. Ingestion keeps accepting while the database is down."""
    try:
        return DeliverySettings.current()
    except DatabaseError:
        logger.warning("delivery settings unreadable, batching with defaults", exc_info=True)
        return DeliverySettings()
