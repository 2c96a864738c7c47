"""Circuits as every worker sees them, against the real Redis with fake clocks: reports, the
feed of changes that keeps each worker's copy up to date, stale state forgotten, and Redis's
clock deciding when an open circuit lets a probe through."""

import re
from typing import Any

import pytest

from delivery import circuit
from delivery.circuit import FORGET_AFTER_MS, Circuits, HostReport
from delivery.clock import RedisClock
from postbackproject import keys, scripts
from postbackproject.queue import get_connection
from tests.fakes import FakeClock

THRESHOLD = 3
OPEN_SECONDS = 30.0


def a_worker(name: str = "worker-1", clock: FakeClock | None = None) -> Circuits:
    connection = get_connection()
    clock = clock or FakeClock()
    return Circuits(name, connection, clock, RedisClock(connection, clock))


def failures(count: int) -> HostReport:
    report = HostReport()
    for _ in range(count):
        report.add(False)
    return report


def answered() -> HostReport:
    report = HostReport()
    report.add(True)
    return report


def report(worker: Circuits, reports: dict[str, HostReport], fresh: bool = True) -> set[str]:
    return worker.report(reports, THRESHOLD, OPEN_SECONDS, fresh=fresh)


def redis_ms() -> int:
    seconds, microseconds = get_connection().time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def test_a_report_that_opens_a_circuit_names_its_host_and_other_workers_learn_it():
    one, other = a_worker("worker-1"), a_worker("worker-2")
    report(other, {})

    assert report(one, {"down.example": failures(THRESHOLD)}) == {"down.example"}
    assert not one.admission("down.example", 15, OPEN_SECONDS).send

    assert report(other, {}) == {"down.example"}
    assert not other.admission("down.example", 15, OPEN_SECONDS).send


def test_failures_below_the_threshold_change_no_admission_and_an_answer_resets_them():
    one, other = a_worker("worker-1"), a_worker("worker-2")

    assert report(one, {"flaky.example": failures(THRESHOLD - 1)}) == set()
    report(other, {})
    assert other.failures_in_row("flaky.example") == THRESHOLD - 1
    assert other.needs_report("flaky.example", answered())  # so that its answer resets the count

    report(other, {"flaky.example": answered()})
    report(one, {"flaky.example": failures(1)})

    assert one.failures_in_row("flaky.example") == 1
    assert one.admission("flaky.example", 15, OPEN_SECONDS).send


def test_an_open_circuit_lets_one_probe_through_once_its_time_has_passed_on_redis_clock():
    clock = FakeClock()
    one, other = a_worker("worker-1", clock), a_worker("worker-2", clock)
    report(one, {"down.example": failures(THRESHOLD)})
    report(other, {})
    deferred = one.admission("down.example", 15, OPEN_SECONDS)
    assert not deferred.send
    assert redis_ms() / 1000 + OPEN_SECONDS <= deferred.defer_until <= redis_ms() / 1000 + OPEN_SECONDS + 10

    clock.now += OPEN_SECONDS + 1  # the workers' clocks move; Redis's is read from them

    assert one.admission("down.example", 15, OPEN_SECONDS) == circuit.Admission(send=True, probe=True)
    assert not other.admission("down.example", 15, OPEN_SECONDS).send  # one probe, for everyone
    probed = HostReport(probed=True)
    probed.add(True)
    assert report(one, {"down.example": probed}) == {"down.example"}  # the probe landed: it closed
    assert report(other, {}) == {"down.example"}
    assert other.admission("down.example", 15, OPEN_SECONDS).send


def test_a_probe_cut_off_unanswered_lets_the_host_be_tried_again():
    clock = FakeClock()
    worker = a_worker("worker-1", clock)
    worker.report({"down.example": failures(THRESHOLD)}, THRESHOLD, open_seconds=0.001)  # open for 1 ms
    clock.now += 1
    assert worker.admission("down.example", 15, OPEN_SECONDS).probe
    assert worker.admission("down.example", 15, OPEN_SECONDS).defer_until == 0.0  # held for the answer

    clock.now += 15 + 5  # the probe's claim ran out (and the key with it, in Redis's time)
    get_connection().delete(keys.circuit_probe("down.example"))

    assert "down.example" in report(worker, {})
    clock.now += 1  # past the 1 ms for sure: that report set the clock by Redis's time again
    assert worker.admission("down.example", 15, OPEN_SECONDS).probe


def test_closing_by_hand_reaches_every_worker():
    one = a_worker()
    report(one, {"down.example": failures(THRESHOLD)})

    circuit.close_circuits(["down.example"])

    assert report(one, {}) == {"down.example"}
    assert one.admission("down.example", 15, OPEN_SECONDS).send
    assert circuit.open_circuits() == []


def test_open_circuits_lists_hosts_with_their_time_and_failures():
    report(a_worker(), {"down.example": failures(THRESHOLD + 2)})

    [(host, until, count, _)] = circuit.open_circuits()

    assert (host, count) == ("down.example", THRESHOLD + 2)
    assert redis_ms() / 1000 < until <= redis_ms() / 1000 + OPEN_SECONDS


def a_long_time_ago() -> int:
    return redis_ms() - FORGET_AFTER_MS - 60_000


def test_circuits_long_past_their_time_and_failures_long_unreported_are_forgotten():
    connection = get_connection()
    worker = a_worker()
    report(worker, {"dead.example": failures(THRESHOLD), "gone.example": failures(2), "recent.example": failures(2)})
    assert not worker.admission("dead.example", 15, OPEN_SECONDS).send
    old = a_long_time_ago()  # as an hour and more of nobody probing or reporting would leave them
    connection.zadd(keys.CIRCUITS_OPEN, {"dead.example": old})
    connection.zadd(keys.CIRCUITS_CHANGES, {"dead.example": old, "gone.example": old})

    changed = report(worker, {})

    assert "dead.example" in changed  # workers' copies see it closed
    assert worker.admission("dead.example", 15, OPEN_SECONDS).send
    assert circuit.open_circuits() == []
    assert connection.hkeys(keys.CIRCUITS_FAILURES) == [b"recent.example"]
    assert not connection.hexists(keys.CIRCUITS_TRIPS, "dead.example")
    assert worker.failures_in_row("gone.example") == 0
    assert worker.failures_in_row("recent.example") == 2


def test_a_circuit_open_for_longer_than_that_is_kept():
    connection = get_connection()
    connection.zadd(keys.CIRCUITS_OPEN, {"slow.example": redis_ms() + 10 * 3600_000})  # a long wait
    connection.zadd(keys.CIRCUITS_CHANGES, {"slow.example": a_long_time_ago()})

    report(a_worker(), {})

    assert [found.host for found in circuit.open_circuits()] == ["slow.example"]


def test_a_refresh_reads_what_changed_not_what_is_open_or_failing(monkeypatch):
    connection = get_connection()
    now = redis_ms()
    connection.zadd(keys.CIRCUITS_OPEN, {f"dead-{n}.example": now + 60_000 for n in range(3000)})
    connection.hset(keys.CIRCUITS_FAILURES, mapping={f"failing-{n}.example": 2 for n in range(7000)})
    connection.zadd(keys.CIRCUITS_CHANGES, {f"dead-{n}.example": now for n in range(3000)})
    connection.zadd(keys.CIRCUITS_CHANGES, {f"failing-{n}.example": now for n in range(7000)})
    replies: list[Any] = []
    run = scripts.run

    def noting_replies(*args: Any, **kwargs: Any) -> Any:
        replies.append(run(*args, **kwargs))
        return replies[-1]

    monkeypatch.setattr(scripts, "run", noting_replies)
    worker, other = a_worker("worker-1"), a_worker("worker-2")
    report(worker, {})
    report(other, {})
    assert len(replies[-1][3]) == 3 * 10_000  # a worker's first read is the whole state, once
    report(other, {"failing-1.example": failures(1)})

    report(worker, {})

    hosts = replies[-1][3][::3]
    assert b"failing-1.example" in hosts and len(hosts) < 10  # what changed since its last read
    assert worker.failures_in_row("failing-1.example") == 3


def a_circuit_past_its_time_and_one_still_open() -> None:
    now = redis_ms()
    get_connection().zadd(keys.CIRCUITS_OPEN, {"back.example": now - 1000, "down.example": now + 60_000})
    get_connection().hset(keys.CIRCUITS_FAILURES, mapping={"back.example": 4, "down.example": 9})


def test_a_circuit_whose_open_time_has_passed_is_listed_as_probe_due_not_open():
    a_circuit_past_its_time_and_one_still_open()

    found = {listed.host: listed for listed in circuit.open_circuits()}

    assert (found["back.example"].state, found["back.example"].failures) == ("probe_due", 4)
    assert (found["down.example"].state, found["down.example"].failures) == ("open", 9)
    assert circuit.count_circuits(get_connection()) == [1, 1]


@pytest.mark.django_db
def test_admin_lists_a_circuit_whose_open_time_has_passed_as_probe_due(admin_client):
    a_circuit_past_its_time_and_one_still_open()

    page = admin_client.get("/admin/delivery/circuitbreaker/").content.decode()

    states = dict(re.findall(r'title="[^"]*">([a-z.]+)</a></td>\s*<td class="circuit-state">([a-z ]+)</td>', page))
    assert states == {"back.example": "probe due", "down.example": "open"}
