"""Attacks from outside: what a stranger can make the service do, and cannot."""

import json
import os
import pickle
import zlib
from pathlib import Path

import pytest
from rq.registry import FailedJobRegistry

from postbackproject.queue import get_connection, get_queue
from tests.conftest import ingest_json, run_worker, success_ids

pytestmark = pytest.mark.django_db(transaction=True)


def plant_job(job_id: str, data: bytes) -> None:
    """A job hash and its queue entry, written straight into Redis (as redis-cli would)."""
    redis = get_connection()
    redis.hset(
        f"rq:job:{job_id}",
        mapping={"data": data, "status": "queued", "origin": "postbacks", "created_at": "2026-11-29T00:00:00.000000Z"},
    )
    redis.rpush("rq:queue:postbacks", job_id)


def test_a_job_naming_any_other_function_is_refused_without_running(client, receiver, tmp_path, caplog):
    marker = tmp_path / "owned"
    plant_job("evil", zlib.compress(json.dumps(["os.system", None, [f"touch {marker}"], {}]).encode()))
    ingest_json(client, {"endpoint": {"method": "GET", "url": receiver.url("/after")}, "data": [{}]})

    run_worker()

    assert not marker.exists()
    assert "evil" in FailedJobRegistry(queue=get_queue()).get_job_ids()
    assert "refused job evil: it names 'os.system'" in caplog.text
    assert receiver.targets == ["/after"]  # the worker carried on


def record_call(*args: object) -> None:
    """A callback that leaves a mark: RQ would call it with (job, connection, ...)."""
    Path(os.environ["POSTBACK_TEST_MARKER"]).touch()


def test_a_job_with_callbacks_of_its_own_does_not_run_them(client, receiver, tmp_path, monkeypatch):
    marker = tmp_path / "called"
    monkeypatch.setenv("POSTBACK_TEST_MARKER", str(marker))
    plant_job("called-back", zlib.compress(json.dumps(["delivery.jobs.drain", None, ["drain-x"], {}]).encode()))
    for callback in ("success_callback_name", "failure_callback_name", "stopped_callback_name"):
        get_connection().hset("rq:job:called-back", callback, "tests.test_security.record_call")

    run_worker()

    assert not marker.exists()


class Explodes:
    """Unpickling this runs a command: what a pickled job could do to a pickle-reading worker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_job_is_never_unpickled(client, receiver, tmp_path):
    marker = tmp_path / "owned"
    plant_job("pickled", zlib.compress(pickle.dumps(Explodes(marker))))
    ingest_json(client, {"endpoint": {"method": "GET", "url": receiver.url("/after")}, "data": [{}]})

    run_worker()

    assert not marker.exists()
    assert len(success_ids()) == 1
