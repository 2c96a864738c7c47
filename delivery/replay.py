"""Replay: send failed postbacks again, exactly as last sent, with a fresh series of tries.

After its last try a postback is failed for good; when the receiver has recovered (it was down
longer than the retry window, say), staff replay it from admin or `manage.py replay`. The
replay keeps the postback's id and continues its attempt numbers, so the log reads as one
history and receivers still deduplicate on X-Postback-Id. Replays are scheduled like retries,
keyed by postback, so replaying twice queues one try.
"""

from collections.abc import Iterable
from datetime import date, datetime, time, timedelta

from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from delivery.models import DeliveryAttempt, Outcome, PostbackRequest
from postbackproject import inbox, shards
from postbackproject.postback import METHODS_WITH_BODY, Try

# Postbacks looked up and queued per query and transaction.
REPLAY_CHUNK = 1000

TIME_FORMATS = (
    "a local time in TIME_ZONE (2026-12-04T14:00 or 2026-12-04 14:00), ISO 8601 with an offset "
    "(2026-12-04T14:00+01:00, 2026-12-04T13:00Z) or a date (2026-12-04)"
)


def failed_postbacks(postback_ids: Iterable[str]) -> list[DeliveryAttempt]:
    """The last attempt of each postback whose last attempt failed for good."""
    latest: dict[str, DeliveryAttempt] = {}
    rows = (
        DeliveryAttempt.objects.filter(postback_id__in=set(postback_ids))
        .exclude(outcome=Outcome.DEFERRED)
        .order_by("postback_id", "attempt", "id")
    )
    for row in rows:
        latest[row.postback_id] = row
    return [row for row in latest.values() if row.outcome == Outcome.FAILED]


def unknown_postbacks(postback_ids: Iterable[str]) -> set[str]:
    """Those of these ids that have no attempt on record: mistyped, or pruned."""
    ids = set(postback_ids)
    known: set[str] = set()
    chunked = sorted(ids)
    for start in range(0, len(chunked), REPLAY_CHUNK):
        rows = DeliveryAttempt.objects.filter(postback_id__in=chunked[start : start + REPLAY_CHUNK])
        known.update(rows.order_by().values_list("postback_id", flat=True).distinct())
    return ids - known


def parse_since(text: str) -> datetime:
    """The start of a replay range as staff type it, in the command or the admin form: a time
    (without an offset, in TIME_ZONE) or a date (its first instant). ValueError says what is
    accepted."""
    when = parse_range_end(text)
    if isinstance(when, datetime):
        return when
    return local_midnight(when)


def parse_until(text: str) -> datetime:
    """The (exclusive) end of a replay range: as parse_since, but a date means the end of that
    day, so that `--since D --until D` is the whole of day D."""
    when = parse_range_end(text)
    if isinstance(when, datetime):
        return when
    return local_midnight(when + timedelta(days=1))


def parse_range_end(text: str) -> datetime | date:
    """An aware datetime, or a date; ValueError for anything else."""
    stripped = text.strip()
    try:
        day = parse_date(stripped)
        when = parse_datetime(stripped) if day is None else None
    except ValueError:  # well formed but impossible: 2026-02-30, an offset of +99:00
        day = when = None
    if day is not None:
        return day
    if when is None:
        raise ValueError(f"use {TIME_FORMATS}; got {text!r}")
    return timezone.make_aware(when) if timezone.is_naive(when) else when


def local_midnight(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time()))


def failed_between(since: datetime, until: datetime | None = None, host: str = "", url_prefix: str = "") -> set[str]:
    """Postbacks with an attempt that failed for good in [since, until), optionally to one
    host (host[:port], as the attempt log shows it) or to URLs starting so. Whether each is
    still failed (and not delivered by a later replay) is for `replay` to check."""
    rows = DeliveryAttempt.objects.filter(outcome=Outcome.FAILED, delivered_at__gte=since)
    if until is not None:
        rows = rows.filter(delivered_at__lt=until)
    if host:
        rows = rows.filter(host=host)
    if url_prefix:
        sent = PostbackRequest.objects.filter(url__startswith=url_prefix).values("postback_id")
        rows = rows.filter(postback_id__in=sent)
    return set(rows.order_by().values_list("postback_id", flat=True).distinct())


def replay_try(last: DeliveryAttempt, sent: PostbackRequest) -> Try:
    """One postback's replay: the final URL, body and sender's headers it was sent with,
    numbered after its last attempt."""
    body = sent.request_body if sent.method in METHODS_WITH_BODY else None
    headers = tuple(sent.headers.items()) if isinstance(sent.headers, dict) else ()
    return Try(last.postback_id, last.attempt + 1, last.attempt, sent.method, sent.url, body, sent.sender, headers)


def replay_tries(postback_ids: list[str]) -> list[Try]:
    """The replays of the failed ones among these postbacks (those whose request is still
    kept: without it there is nothing to send)."""
    failed = failed_postbacks(postback_ids)
    sent = PostbackRequest.of(row.postback_id for row in failed)
    return [replay_try(row, sent[row.postback_id]) for row in failed if row.postback_id in sent]


def replay(postback_ids: Iterable[str]) -> int:
    """Queue the failed ones among these postbacks again; returns how many were queued.

    Works through the ids a chunk at a time, so replaying a day of failures keeps one
    bounded query and one transaction in hand, not all of them.
    """
    ids = sorted(set(postback_ids))
    queued = 0
    for start in range(0, len(ids), REPLAY_CHUNK):
        tries = replay_tries(ids[start : start + REPLAY_CHUNK])
        if tries:
            # Due now, by Redis's clock, in the shard whose turn it is.
            inbox.schedule_tries(shards.turns.next(), [(item, 0.0) for item in tries])
        queued += len(tries)
    if queued:
        inbox.sweep()  # due now: into the inbox, and a drainer started if none is alive
    return queued
