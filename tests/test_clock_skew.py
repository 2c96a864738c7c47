"""Workers on machines whose clocks are wrong: a real worker process (`manage.py rqworker
postbacks --with-scheduler`) whose wall clock is 30 s ahead of, or behind, everyone else's
(Debian's libfaketime, preloaded). Redis's clock decides when a try is due and when a circuit
lets a probe through, so such a worker sends nothing early and holds nothing late.

Redis and this test run on the true clock (one machine: Redis's TIME is this process's
time.time()). The bounds below are in seconds where a 30 s skew would break them by 30 s.
"""

import glob
from typing import Any

import pytest

from delivery import circuit
from delivery.models import DeliveryAttempt, DeliverySettings
from postbackproject import keys
from postbackproject.queue import get_connection
from tests.conftest import Receiver, Reply, ingest_json, success_ids, wait_until

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))), None)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime is not installed (apt-get install faketime)"),
]

SKEWS = pytest.mark.parametrize("skew", [30, -30], ids=["ahead", "behind"])
# How late a due try may go out: the idle worker's sweep each second, a drain job's start.
LATE_AT_MOST = 10.0


def skewed_clock(seconds: int) -> dict[str, str]:
    """The environment that sets a process's wall clock off by `seconds` (monotonic untouched)."""
    assert LIBFAKETIME is not None
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"{seconds:+d}s", "DONT_FAKE_MONOTONIC": "1"}


def redis_now() -> float:
    seconds, microseconds = get_connection().time()
    return int(seconds) + int(microseconds) / 1e6


def document(receiver: Receiver, count: int) -> dict[str, object]:
    return {"endpoint": {"method": "GET", "url": receiver.url("/p?n={n}")}, "data": [{"n": n} for n in range(count)]}


def assert_the_worker_clock_is_off(skew: int, receiver: Receiver) -> None:
    """The attempt rows carry the worker's own idea of the time: proof that the skew is real."""
    first = DeliveryAttempt.objects.order_by("id").first()
    assert first is not None
    assert abs(first.delivered_at.timestamp() - (receiver.requests[0].received_at + skew)) < 5


@SKEWS
def test_a_worker_with_a_wrong_clock_makes_a_retry_due_its_backoff_after_the_attempt_and_sends_it_then(
    client, processes, receiver, skew
):
    DeliverySettings(backoff_base_seconds=2, backoff_factor=1).save()  # the retry: 1 to 2 s after
    receiver.answer(Reply(503))
    before = redis_now()
    [pid] = ingest_json(client, document(receiver, 1)).json()["postbacks"]
    processes.worker(**skewed_clock(skew))

    wait_until(lambda: get_connection().zscore(keys.DUE, pid) is not None, timeout=30, what="the retry scheduled")
    score: Any = get_connection().zscore(keys.DUE, pid)
    due = score / 1000
    assert before + 1 <= due <= redis_now() + 2

    wait_until(lambda: success_ids() == {pid}, timeout=30, what="the retry delivered")
    assert_the_worker_clock_is_off(skew, receiver)
    retry = receiver.requests[1]
    assert due - 0.01 <= retry.received_at <= due + LATE_AT_MOST


@SKEWS
def test_a_worker_with_a_wrong_clock_opens_and_probes_circuits_by_redis_clock(client, processes, receiver, skew):
    DeliverySettings(
        circuit_failure_threshold=2, circuit_open_seconds=3, max_in_flight_per_host=1, backoff_base_seconds=0
    ).save()
    receiver.answer(Reply(503), Reply(503))  # then 200: the probe closes the circuit
    before = redis_now()
    ids = ingest_json(client, document(receiver, 4)).json()["postbacks"]
    processes.worker(**skewed_clock(skew))

    wait_until(lambda: circuit.open_circuits(), timeout=30, what="the circuit to open")
    [(_, until, _, _)] = circuit.open_circuits()
    assert before + 3 <= until <= redis_now() + 3

    wait_until(lambda: success_ids() == set(ids), timeout=30, what="every postback delivered")
    assert_the_worker_clock_is_off(skew, receiver)
    probe, *after = receiver.requests[2:]
    assert until - 0.01 <= probe.received_at <= until + LATE_AT_MOST  # not early, not held
    assert all(request.received_at >= until for request in after)
    assert circuit.open_circuits() == []
