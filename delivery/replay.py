"""Replay: send failed postbacks again, exactly as last sent, with a fresh series of tries.

After its last try a postback is failed for good; when the receiver has recovered (it was down
longer than the retry window, say), staff replay it from admin or `manage.py replay`. The
replay keeps the postback's id and continues its attempt numbers, so the log reads as one
history and receivers still deduplicate on X-Postback-Id.
"""

from collections.abc import Iterable

from delivery.models import DeliveryAttempt, DeliverySettings, Outcome
from postbackproject.postback import Batch
from postbackproject.queue import enqueue_batches

# Postbacks looked up and queued per query and pipeline.
REPLAY_CHUNK = 1000


def failed_postbacks(postback_ids: Iterable[str]) -> list[DeliveryAttempt]:
    """The last attempt of each postback whose last attempt failed for good."""
    latest: dict[str, DeliveryAttempt] = {}
    for row in DeliveryAttempt.objects.filter(postback_id__in=set(postback_ids)).order_by("postback_id", "attempt"):
        latest[row.postback_id] = row
    return [row for row in latest.values() if row.outcome == Outcome.FAILED]


def replay_batch(last: DeliveryAttempt) -> Batch:
    """One postback's replay: the final URL and body it was last sent with."""
    return {
        "batch": last.postback_id,
        "attempt": last.attempt + 1,
        "offset": last.attempt,
        "method": last.method,
        "url": last.url,
        "rendered": True,
        "postbacks": [[last.postback_id, last.request_body or "{}"]],
    }


def replay(postback_ids: Iterable[str]) -> int:
    """Queue the failed ones among these postbacks again; returns how many were queued.

    Works through the ids a chunk at a time, so replaying a day of failures keeps one
    bounded query and one pipeline in hand, not all of them.
    """
    ids = sorted(set(postback_ids))
    timeout = DeliverySettings.current().job_timeout_seconds(1)
    queued = 0
    for start in range(0, len(ids), REPLAY_CHUNK):
        batches = [replay_batch(row) for row in failed_postbacks(ids[start : start + REPLAY_CHUNK])]
        if batches:
            enqueue_batches(batches, timeout)
        queued += len(batches)
    return queued
