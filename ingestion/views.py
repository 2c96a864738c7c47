"""The ingestion endpoint: one validated request in, one queue job per batch out, 202."""

import logging
import uuid

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError

from delivery.models import DeliverySettings
from ingestion.validation import IngestRequest, InvalidRequest, parse_body
from postbackproject.postback import Batch
from postbackproject.queue import backlog, enqueue_batches

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
def ingest(request: HttpRequest) -> JsonResponse:
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

    config = batching_settings()
    ids = [uuid.uuid4().hex for _ in parsed.data_texts]
    batches = make_batches(parsed, ids, config.batch_size)
    timeout = config.job_timeout_seconds(config.batch_size)
    try:
        if (reason := backlog.full_reason()) is not None:
            return unavailable(reason)
        enqueue_batches(batches, timeout)
    except RedisError as exc:
        logger.error("queue unavailable: %s", exc)
        return unavailable("queue unavailable, nothing was accepted")
    return JsonResponse({"accepted": len(ids), "postbacks": ids}, status=202)


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


def make_batches(parsed: IngestRequest, ids: list[str], batch_size: int) -> list[Batch]:
    """One batch per batch_size data objects, each carrying the endpoint once."""
    pairs = [[pid, text] for pid, text in zip(ids, parsed.data_texts, strict=True)]
    return [
        {
            "batch": ids[start],
            "attempt": 1,
            "offset": 0,
            "method": parsed.method,
            "url": parsed.url,
            "postbacks": pairs[start : start + batch_size],
        }
        for start in range(0, len(pairs), batch_size)
    ]
