"""The RQ job functions that workers run (named by path in postbackproject.postback)."""

from delivery.drain import Drainer


def drain(drainer_id: str) -> dict[str, int]:
    """Deliver from the inbox until it runs dry or this job's time is up; returns counts by
    outcome (for RQ's log)."""
    return Drainer(drainer_id).run()
