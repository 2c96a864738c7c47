"""The few views that read attempt rows themselves: one postback's history, and the latest
failures of a window. Both are bounded by an index (postback id; outcome or host, outcome
and time), whatever the size of the log."""

from collections import Counter
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from dashboard.ranges import Window
from delivery.models import DeliveryAttempt, Outcome, PostbackRequest

FAILING = (Outcome.FAILED, Outcome.RETRY)
# Failing attempts listed, newest first, and how many of the newest are read for the reasons.
LATEST = 20
REASONS_FROM = 1000
_COLUMNS = (
    "postback_id",
    "attempt",
    "host",
    "delivered_at",
    "response_code",
    "error",
    "response_body",
    "outcome",
)


def history(postback_id: str) -> list[DeliveryAttempt]:
    """Every attempt of one postback, first try first."""
    return list(DeliveryAttempt.objects.filter(postback_id=postback_id).order_by("attempt", "delivered_at", "id"))


def request_of(postback_id: str) -> PostbackRequest | None:
    """What the postback sends, as stored once for all its tries."""
    return PostbackRequest.of([postback_id]).get(postback_id)


def newest_failures(window: Window, host: str | None, limit: int) -> list[DeliveryAttempt]:
    """The newest failing attempts of the window: one index range per outcome, merged here
    (an IN over both would make the database sort every match)."""
    found: list[DeliveryAttempt] = []
    for outcome in FAILING:
        rows: QuerySet[DeliveryAttempt] = DeliveryAttempt.objects.filter(
            outcome=outcome, delivered_at__gte=window.start, delivered_at__lt=window.end
        )
        if host is not None:
            rows = rows.filter(host=host)
        found += rows.order_by("-delivered_at").only(*_COLUMNS)[:limit]
    return sorted(found, key=lambda row: row.delivered_at, reverse=True)[:limit]


def failures(window: Window, host: str | None) -> dict[str, Any]:
    """Why attempts failed: the reasons among the newest failures, and the newest few."""
    newest = newest_failures(window, host, REASONS_FROM)
    reasons: Counter[tuple[str, str]] = Counter((row.host, row.why()) for row in newest)
    zone = timezone.get_current_timezone()
    return {
        "window": window.describe(),
        "host": host,
        "reasons_from": len(newest),
        "reasons": [{"host": h, "reason": why, "attempts": n} for (h, why), n in reasons.most_common(10)],
        "latest": [
            {
                "postback_id": row.postback_id,
                "attempt": row.attempt,
                "host": row.host,
                "delivered_at": row.delivered_at.astimezone(zone).isoformat(),
                "response_code": row.response_code,
                "outcome": row.outcome,
                "reason": row.why(),  # as in "reasons": one name for one thing
            }
            for row in newest[:LATEST]
        ],
    }
