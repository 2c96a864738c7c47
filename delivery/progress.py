"""What the attempt log already says about tries about to be made.

A try can come round again: its drainer died after sending (the entry is claimed by another),
or a retry was scheduled twice. Before sending such tries, delivery reads what is recorded:
a postback with a final outcome is never sent again, and one whose try is recorded as "will
retry" only gets its next try scheduled (again: scheduling is keyed by postback, so twice is
once).
"""

from collections import defaultdict
from dataclasses import dataclass, field, replace

from delivery.models import FINAL_OUTCOMES, DeliveryAttempt, DeliverySettings, Outcome
from delivery.policy import backoff_seconds
from postbackproject.postback import Try

# Postback ids per lookup query.
QUERY_CHUNK = 1000


@dataclass
class Resumed:
    to_send: list[Try] = field(default_factory=list)
    follow_ups: list[tuple[Try, float]] = field(default_factory=list)  # (next try, seconds from now)
    settled: int = 0  # tries whose postback already has a final outcome


def resume(tries: list[Try], config: DeliverySettings) -> Resumed:
    """Sort tries into those to send, those already done, and those only to reschedule."""
    recorded = recorded_tries([item.postback_id for item in tries])
    resumed = Resumed()
    for item in tries:
        since = [
            (attempt, outcome) for attempt, outcome in recorded.get(item.postback_id, ()) if attempt >= item.attempt
        ]
        if not since:
            resumed.to_send.append(item)
        elif any(outcome in FINAL_OUTCOMES for _, outcome in since):
            resumed.settled += 1
        else:
            latest = max(attempt for attempt, _ in since)
            delay = backoff_seconds(latest - item.offset, config)
            resumed.follow_ups.append((replace(item, attempt=latest + 1), delay))
    return resumed


def recorded_tries(postback_ids: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Every try recorded as sent (not deferred) for these postbacks: id -> [(attempt, outcome)]."""
    found: dict[str, list[tuple[int, str]]] = defaultdict(list)
    unique = sorted(set(postback_ids))
    for start in range(0, len(unique), QUERY_CHUNK):
        rows = (
            DeliveryAttempt.objects.filter(postback_id__in=unique[start : start + QUERY_CHUNK])
            .exclude(outcome=Outcome.DEFERRED)
            .values_list("postback_id", "attempt", "outcome")
        )
        for postback_id, attempt, outcome in rows:
            found[postback_id].append((attempt, outcome))
    return found
