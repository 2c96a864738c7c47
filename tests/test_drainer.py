"""The drainer's loop and settling, driven with a fake transport and a fake clock: no HTTP, no
waiting on wall-clock time. Redis, the database and the engine are real."""

import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from django.conf import settings

from delivery import drain
from delivery.circuit import Circuits
from delivery.clock import RedisClock
from delivery.drain import Drainer
from delivery.engine import Engine
from delivery.models import DeliveryAttempt, DeliverySettings
from delivery.transport import Request
from postbackproject import inbox, keys, shards
from postbackproject.queue import get_connection, get_queue
from tests.fakes import Answer, FakeClock, FakeTransport

pytestmark = pytest.mark.django_db


class SpyEngine(Engine):
    """The engine, noting which hosts it was told to give another turn."""

    told: list[set[str] | None]

    def reconsider(self, hosts: Iterable[str] | None = None) -> None:
        self.told.append(None if hosts is None else set(hosts))
        super().reconsider(hosts)


def a_drainer(transport: FakeTransport, clock: FakeClock, drainer_id: str = "drain-test") -> Drainer:
    connection = get_connection()
    circuits = Circuits("test-worker", connection, clock, RedisClock(connection, clock))
    engine = SpyEngine(transport, circuits, concurrency=8)
    engine.told = []
    return Drainer(drainer_id, connection, engine, circuits, clock)


def add_request(urls: list[str]) -> list[str]:
    """Each URL as a request of one GET postback, straight into the inbox (no drain job is
    started for it); returns the postback ids."""
    ids = []
    for url in urls:
        request_id = uuid.uuid4().hex
        [entry] = inbox.request_entries(request_id, "GET", url, ["{}"], 100)
        get_connection().xadd(keys.INBOX, {"r": entry})
        ids.append(inbox.postback_id(request_id, 0))
    return ids


def add_large_request(template: str, objects: int) -> list[str]:
    """One request of `objects` GET postbacks (`{"n": index}` each), straight into the inbox as
    one entry; returns the postback ids."""
    request_id = uuid.uuid4().hex
    [entry] = inbox.request_entries(request_id, "GET", template, [f'{{"n":{n}}}' for n in range(objects)], 100)
    get_connection().xadd(keys.INBOX, {"r": entry})
    return [inbox.postback_id(request_id, n) for n in range(objects)]


def making_in_slices(drainer: Drainer, monkeypatch, after_made: Callable[[int], None] = lambda made: None) -> list[str]:
    """Slices of no time (one try made a turn); returns the engine's events as they come:
    "made N" when N tries reach it, "landed" for each reply taken."""
    monkeypatch.setattr(drain, "RENDER_SLICE_SECONDS", 0.0)
    events: list[str] = []
    add, step = drainer.engine.add, drainer.engine.step

    def adding(works, config):
        works = list(works)
        events.append(f"made {len(works)}")
        add(works, config)
        after_made(sum(int(event.split()[1]) for event in events if event.startswith("made")))

    def stepping(*args, **kwargs):
        finished = step(*args, **kwargs)
        events.extend(["landed"] * len(finished))
        return finished

    drainer.engine.add = adding  # type: ignore[method-assign]
    drainer.engine.step = stepping  # type: ignore[method-assign]
    return events


def redis_ms() -> int:
    seconds, microseconds = get_connection().time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def by_path(answers: dict[str, Answer]) -> Callable[[Request], Answer]:
    return lambda request: answers[request.url.rsplit("/", 1)[1]]


def test_the_loop_sends_each_postback_records_it_and_acknowledges_its_entry():
    clock = FakeClock()
    transport = FakeTransport(clock)
    ids = add_request(["http://a.example/one", "http://b.example/two"])

    counts = a_drainer(transport, clock).run()

    assert counts == {"success": 2}
    assert sorted(request.url for request in transport.sent) == ["http://a.example/one", "http://b.example/two"]
    assert set(DeliveryAttempt.objects.values_list("postback_id", flat=True)) == set(ids)
    assert get_connection().xlen(keys.INBOX) == 0
    assert get_connection().xpending(keys.INBOX, keys.GROUP)["pending"] == 0


def test_a_retry_is_due_its_backoff_after_the_attempt_by_redis_clock():
    DeliverySettings(backoff_base_seconds=10, backoff_factor=4).save()
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(503, after=2.0))
    [pid] = add_request(["http://a.example/r"])
    before = redis_ms()

    a_drainer(transport, clock).run()

    waiting: Any = get_connection().zrange(keys.DUE, 0, -1, withscores=True)
    [(member, due)] = waiting
    assert member.decode() == pid
    assert before + 5_000 <= due <= redis_ms() + 10_000  # 10 s with equal jitter: 5 to 10 s
    next_try: Any = get_connection().hget(keys.DUE_TRIES, pid)
    assert json.loads(next_try)[1] == 2  # the second attempt


def test_an_idle_drainer_waits_its_idle_time_on_its_own_clock_and_leaves(settings):
    settings.DELIVERY_DRAINER_IDLE_SECONDS = 30
    clock = FakeClock()
    started = clock.now

    assert a_drainer(FakeTransport(clock), clock).run() == {}

    assert clock.now - started >= 30
    assert get_connection().zscore(keys.LEASES, "drain-test") is None  # it left


def test_a_drainer_hands_over_after_its_time_box_without_starting_what_waits(settings):
    settings.DELIVERY_DRAINER_MAX_SECONDS = 6
    DeliverySettings(max_in_flight_per_host=1).save()
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(200, after=2.5))
    add_request([f"http://slow.example/{n}" for n in range(5)])

    counts = a_drainer(transport, clock).run()

    assert counts["success"] == 3  # 0-2.5 s, 2.5-5 s, 5-7.5 s: the third was out at 6 s
    assert counts["handed over"] == 2
    [successor] = get_queue().jobs
    assert successor.id != "drain-test"
    assert get_connection().xpending(keys.INBOX, keys.GROUP)["pending"] == 2  # left for the successor


def test_a_drainer_hands_over_to_a_drain_job_that_waits_for_a_worker_after_its_fair_share(settings):
    settings.INBOX_SHARDS = 3
    DeliverySettings(max_in_flight_per_host=1).save()
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(200, after=2.5))
    add_request([f"http://slow.example/{n}" for n in range(10)])  # 25 s of work, one at a time
    waiting = shards.configured()[1].new_drainer_id()
    inbox.start_drainer(waiting)  # another shard's drainer, with no worker free to run it
    started = clock.now

    counts = a_drainer(transport, clock).run()

    # It ran its fair share (10 s), finished what was out, and left the rest pending for a
    # successor queued behind the waiting job.
    assert 4 <= counts["success"] <= 6
    assert counts["success"] + counts["handed over"] == 10
    assert clock.now - started < 20
    [first, successor] = get_queue().job_ids
    assert first == waiting and successor.startswith("drain-")


def test_a_drain_job_queued_for_a_shard_that_is_drained_already_is_no_reason_to_hand_over(settings):
    settings.INBOX_SHARDS = 3
    DeliverySettings(max_in_flight_per_host=1).save()
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(200, after=2.5))
    add_request([f"http://slow.example/{n}" for n in range(10)])
    other = shards.configured()[1]
    running = other.new_drainer_id()  # the other shard's drainer, running on another worker
    get_connection().zadd(other.leases, {running: redis_ms() + 3_600_000})
    inbox.start_drainer(other.new_drainer_id())  # a colleague it recruited, waiting for a worker

    counts = a_drainer(transport, clock).run()

    assert counts == {"success": 10}


def test_a_warm_shutdown_cuts_off_what_is_still_out_after_the_grace(settings):
    settings.DELIVERY_STOP_GRACE_SECONDS = 2
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(200, after=10.0))
    add_request(["http://stuck.example/x"])
    drainer = a_drainer(transport, clock)
    step = drainer.engine.step

    def stop_once_sending(*args, **kwargs):
        if drainer.engine.in_flight:
            drain.request_stop()
        return step(*args, **kwargs)

    drainer.engine.step = stop_once_sending  # type: ignore[method-assign]
    started = clock.now

    drainer.run()

    assert 2 <= clock.now - started < 10
    assert transport.abandoned == 1
    assert not DeliveryAttempt.objects.exists()  # cut off: sent again by the successor
    assert len(get_queue().jobs) == 1


def test_when_a_circuit_opens_only_its_host_gets_another_turn():
    DeliverySettings(circuit_failure_threshold=2, max_in_flight_per_host=1, backoff_base_seconds=0).save()
    clock = FakeClock()
    transport = FakeTransport(clock, by_path({"down": Answer(503), "up": Answer(200)}))
    add_request(["http://down.example/down"] * 4 + ["http://up.example/up"] * 4)
    drainer = a_drainer(transport, clock)

    drainer.run()

    told = drainer.engine.told  # type: ignore[attr-defined]
    assert {"down.example"} in told
    assert None not in told and all("up.example" not in hosts for hosts in told if hosts)
    assert sum(request.url.endswith("/down") for request in transport.sent) == 2


def test_deferred_tries_are_due_when_the_circuit_lets_them_by_redis_clock():
    DeliverySettings(circuit_failure_threshold=1, circuit_open_seconds=40, max_in_flight_per_host=1).save()
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(503))
    add_request(["http://down.example/d"] * 3)

    a_drainer(transport, clock).run()

    opened: Any = get_connection().zrange(keys.CIRCUITS_OPEN, 0, -1, withscores=True)
    [(_, until)] = opened
    assert redis_ms() < until <= redis_ms() + 40_000
    deferred = DeliveryAttempt.objects.filter(outcome="deferred").values_list("postback_id", flat=True)
    assert len(deferred) == 2  # never sent: the circuit opened after the first failure
    for pid in deferred:
        due: Any = get_connection().zscore(keys.DUE, pid)
        assert due is not None and until - 1_000 <= due <= until + 10_000 + 1_000  # spread up to 10 s


def test_a_drainer_with_every_connection_busy_and_work_waiting_recruits_a_colleague():
    """Slow receivers fill the connections long before reads come back full: a drainer whose
    slots are all taken, with postbacks waiting to start, asks for another worker's help."""
    get_connection().sadd(keys.queue_workers(settings.POSTBACK_QUEUE), "worker-1", "worker-2")  # two listen
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(200, after=5.0))
    add_request([f"http://slow.example/{n}" for n in range(20)])
    drainer = a_drainer(transport, clock)  # 8 connections

    drainer.run()

    [colleague] = get_queue().jobs
    assert colleague.id != "drain-test"
    assert get_connection().zscore(keys.LEASES, colleague.id) is not None


def test_a_failing_drainer_drops_what_it_has_in_flight_for_the_next_to_send():
    """The transport outlives the job: replies to a failed job's requests must not reach the
    next job's engine. Its entries go to the drainer that takes them over."""
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(200, after=30.0))
    add_request([f"http://slow.example/{n}" for n in range(3)])
    drainer = a_drainer(transport, clock)
    step = drainer.engine.step

    def fail_once_sending(*args, **kwargs):
        if drainer.engine.in_flight:
            raise RuntimeError("the database went away")
        return step(*args, **kwargs)

    drainer.engine.step = fail_once_sending  # type: ignore[method-assign]

    with pytest.raises(RuntimeError):
        drainer.run()

    assert transport.abandoned == 3
    assert transport.in_flight == 0
    assert get_connection().xpending(keys.INBOX, keys.GROUP)["pending"] == 3  # left for a successor


def test_a_drainer_waiting_on_slow_replies_asks_the_inbox_forty_times_a_second_not_hundreds():
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(200, after=10.0))
    add_request(["http://slow.example/one"])
    drainer = a_drainer(transport, clock)
    reads: list[float] = []
    read = drainer.intake.read

    def counting(count: int, block_ms: int) -> list[Any]:
        reads.append(clock.now)
        return read(count, block_ms)

    drainer.intake.read = counting  # type: ignore[method-assign]

    drainer.run()

    while_waiting = [at for at in reads if 1 <= at - reads[0] <= 9]  # the reply is 10 s out
    assert 8 * 30 <= len(while_waiting) <= 8 * 45  # about forty a second: new entries still come in


def test_a_large_request_is_made_a_slice_a_turn_with_replies_taken_in_between(monkeypatch):
    """Filling in a request's URLs never holds the loop longer than RENDER_SLICE_SECONDS: with
    slices of no time, one try is made a turn, and what has landed is taken before the next."""
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(200, after=0.0))
    ids = add_large_request("http://big.example/{n}", 5)
    drainer = a_drainer(transport, clock)
    events = making_in_slices(drainer, monkeypatch)

    assert drainer.run() == {"success": 5}

    assert events == ["made 1", "landed"] * 5
    assert [request.postback_id for request in transport.sent] == ids
    assert get_connection().xlen(keys.INBOX) == 0
    assert get_connection().xpending(keys.INBOX, keys.GROUP)["pending"] == 0


def test_a_request_partly_made_when_its_drainer_hands_over_is_finished_by_the_successor(monkeypatch):
    """An entry is acknowledged only once every try of it is made and recorded: the tries its
    drainer had not made yet are left pending for the next, which sends each of them once."""
    clock = FakeClock()
    transport = FakeTransport(clock, lambda request: Answer(200, after=0.0))
    ids = add_large_request("http://big.example/{n}", 5)
    first = a_drainer(transport, clock)
    making_in_slices(first, monkeypatch, after_made=lambda made: drain.request_stop() if made == 2 else None)

    assert first.run() == {"success": 2, "handed over": 3}
    assert get_connection().xpending(keys.INBOX, keys.GROUP)["pending"] == 1  # the entry, for the successor

    [successor] = get_queue().jobs
    drain._stop.clear()
    assert a_drainer(transport, clock, successor.id).run() == {"success": 3, "already recorded": 2}
    assert sorted(request.postback_id for request in transport.sent) == sorted(ids)
    assert get_connection().xpending(keys.INBOX, keys.GROUP)["pending"] == 0
