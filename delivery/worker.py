"""The RQ worker class that `manage.py rqworker` builds (settings.RQ["WORKER_CLASS"])."""

from typing import Any

from django.db import close_old_connections
from rq import Queue, SimpleWorker
from rq.job import Job

from postbackproject.queue import CompactJSONSerializer


class DeliveryWorker(SimpleWorker):
    """Runs jobs in its own process, without a fork per job.

    A fork per job would throw away the keep-alive connection pool and the thread pool that
    make delivery fast, and costs more than a delivery on loopback. Database connections are
    checked between jobs, so a database restart costs one failed job at most, not a dead worker.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # `rqworker` passes its own --serializer (pickle by default); jobs are JSON, always.
        kwargs["serializer"] = CompactJSONSerializer
        super().__init__(*args, **kwargs)

    def execute_job(self, job: Job, queue: Queue) -> None:
        close_old_connections()
        try:
            super().execute_job(job, queue)
        finally:
            close_old_connections()
