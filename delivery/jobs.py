"""The RQ job: deliver one batch of postbacks, record every attempt, schedule the retries.

A job may run more than once for the same try (its worker died, or the database failed after
the requests went out and RQ reran it). It therefore starts from what the database already
holds: a postback with a final outcome is not sent again, and one already tried in this try
is only rescheduled. Delivery stays at-least-once; receivers deduplicate on X-Postback-Id.
"""

import json
import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

from django.conf import settings

from delivery.models import FINAL_OUTCOMES, DeliveryAttempt, DeliverySettings, Outcome
from delivery.policy import outcome_of, retry_delay_seconds
from delivery.templating import render_url
from delivery.transport import Request, Response, send
from postbackproject.postback import METHODS_WITH_BODY, Batch, loads_data_object
from postbackproject.queue import schedule_batch

attempt_log = logging.getLogger("delivery.attempts")


@dataclass(frozen=True)
class Progress:
    """What the database says about a batch's postbacks before this try starts."""

    finished: frozenset[str]  # a final outcome is recorded
    tried_now: frozenset[str]  # this very try is recorded (as "retry")


def recorded_progress(batch: Batch) -> Progress:
    """Only this series counts: a replay (offset > 0) follows tries that ended in failure."""
    rows = DeliveryAttempt.objects.filter(
        postback_id__in=[pid for pid, _ in batch["postbacks"]], attempt__gt=batch["offset"]
    ).values_list("postback_id", "attempt", "outcome")
    attempt = batch["attempt"]
    finished = {pid for pid, _, outcome in rows if outcome in FINAL_OUTCOMES}
    tried_now = {pid for pid, number, _ in rows if number >= attempt} - finished
    return Progress(frozenset(finished), frozenset(tried_now))


def build_request(batch: Batch, postback_id: str, data_text: str, config: DeliverySettings) -> Request:
    data = loads_data_object(data_text)
    body = data_text.encode() if batch["method"] in METHODS_WITH_BODY else None
    url = batch["url"] if batch.get("rendered") else render_url(batch["url"], data, config.unmatched_default)
    return Request(postback_id=postback_id, attempt=batch["attempt"], method=batch["method"], url=url, body=body)


@cache
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=settings.DELIVERY_CONCURRENCY, thread_name_prefix="deliver")


def send_all(requests: Sequence[Request], config: DeliverySettings) -> list[Response]:
    """Send concurrently over the process's shared connection pool, results in order."""

    def send_one(request: Request) -> Response:
        return send(
            request, config.connect_timeout_seconds, config.read_timeout_seconds, config.response_body_max_bytes
        )

    if len(requests) == 1:  # the common small request: no hand-off to a thread
        return [send_one(requests[0])]
    return list(_executor().map(send_one, requests))


def attempt_row(request: Request, response: Response, outcome: Outcome) -> DeliveryAttempt:
    return DeliveryAttempt(
        postback_id=request.postback_id,
        attempt=request.attempt,
        method=request.method,
        url=request.url,
        request_body=request.body.decode() if request.body is not None else "",
        delivered_at=response.delivered_at,
        response_code=response.status,
        response_time_ms=round(response.elapsed_ms, 2),
        response_body=response.body,
        error=response.error,
        outcome=outcome,
    )


def log_attempt(row: DeliveryAttempt) -> None:
    """One JSON line per attempt, with the same facts as the row."""
    attempt_log.info(
        json.dumps(
            {
                "event": "delivery_attempt",
                "postback_id": row.postback_id,
                "attempt": row.attempt,
                "method": row.method,
                "url": row.url,
                "delivered_at": row.delivered_at.isoformat(),
                "response_code": row.response_code,
                "response_time_ms": row.response_time_ms,
                "response_body": row.response_body,
                "error": row.error,
                "outcome": row.outcome,
            },
            ensure_ascii=False,
        )
    )


def deliver_batch(batch: Batch) -> dict[str, int]:
    """Deliver the batch's postbacks once; returns a count per outcome (for the RQ log)."""
    config = DeliverySettings.current()
    try_in_series = batch["attempt"] - batch["offset"]
    progress = recorded_progress(batch)

    done_in_this_try = progress.finished | progress.tried_now
    to_send = [(pid, text) for pid, text in batch["postbacks"] if pid not in done_in_this_try]
    outgoing = [build_request(batch, pid, text, config) for pid, text in to_send]
    responses = send_all(outgoing, config)
    rows = [
        attempt_row(req, resp, outcome_of(resp, try_in_series, config))
        for req, resp in zip(outgoing, responses, strict=True)
    ]
    DeliveryAttempt.objects.bulk_create(rows, ignore_conflicts=True)
    for row in rows:
        log_attempt(row)

    retrying = [(row, resp) for row, resp in zip(rows, responses, strict=True) if row.outcome == Outcome.RETRY]
    retry_ids = set(progress.tried_now) | {row.postback_id for row, _ in retrying}
    if retry_ids:
        # One retry job per try: the batch shares a receiver, so its longest Retry-After rules.
        asked = [resp.retry_after_seconds for _, resp in retrying if resp.retry_after_seconds is not None]
        delay = retry_delay_seconds(try_in_series, max(asked, default=None), config)
        schedule_retry(batch, retry_ids, delay, config)

    return dict(Counter(str(row.outcome) for row in rows))


def schedule_retry(batch: Batch, postback_ids: set[str], delay: float, config: DeliverySettings) -> None:
    """The next try of this batch, for the given postbacks only."""
    retry: Batch = {
        **batch,
        "attempt": batch["attempt"] + 1,
        "postbacks": [pair for pair in batch["postbacks"] if pair[0] in postback_ids],
    }
    schedule_batch(retry, delay, config.job_timeout_seconds(len(retry["postbacks"])))
