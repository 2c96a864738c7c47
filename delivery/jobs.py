"""The RQ job functions that workers run (named by path in postbackproject.postback)."""

from delivery.drain import Drainer
from postbackproject.profiling import job_is_to_be_profiled, profiled


def drain(drainer_id: str) -> dict[str, int]:
    """Deliver from the inbox until it runs dry or this job's time is up; returns counts by
    outcome (for RQ's log). Profiled when `manage.py profilejob` asked for it."""
    drainer = Drainer.in_this_process(drainer_id)
    if job_is_to_be_profiled():
        with profiled(f"job-{drainer_id}"):
            return drainer.run()
    return drainer.run()
