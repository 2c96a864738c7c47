"""The engine's choices, driven through a fake transport and fake circuits: who gets the next
connection, how hosts earn their limits, and how hosts that have not answered are held to
their share. No Redis, no receiver, no waiting: replies land when a test says so."""

from collections import Counter
from datetime import UTC, datetime

import pytest

from delivery.circuit import SEND, Admission
from delivery.engine import Engine, Finished, Work
from delivery.hosts import INITIAL_IN_FLIGHT, RememberedLimits, unproven_slots
from delivery.models import DeliverySettings
from delivery.transport import Limits, Request, Response
from postbackproject.postback import Try


class FakeTransport:
    """Takes requests and holds them until the test answers them."""

    def __init__(self) -> None:
        self.out: dict[str, Work] = {}  # postback id -> work, in the order started
        self.ready: list[tuple[object, Response]] = []
        self.started: list[Request] = []

    @property
    def in_flight(self) -> int:
        return len(self.out)

    def start(self, request: Request, limits: Limits, token: object) -> None:
        assert isinstance(token, Work)
        self.out[request.postback_id] = token
        self.started.append(request)

    def poll(self, timeout: float) -> list[tuple[object, Response]]:
        ready, self.ready = self.ready, []
        return ready

    def abandon(self) -> None:
        self.out.clear()

    def in_flight_to(self, host: str) -> int:
        return sum(1 for work in self.out.values() if work.host == host)

    def answer(self, host: str | None = None, status: int | None = 200, seconds: float = 0.01) -> int:
        """Every request out (to `host`) lands: answered with status, or timed out (None)."""
        landing = [pid for pid, work in self.out.items() if host is None or work.host == host]
        for pid in landing:
            work = self.out.pop(pid)
            response = Response(
                delivered_at=datetime.now(UTC),
                status=status,
                elapsed_ms=seconds * 1000,
                error="" if status else "read timeout",
                transient=status is None,
            )
            self.ready.append((work, response))
        return len(landing)


class OpenGate:
    """Every circuit closed, except the hosts told otherwise."""

    def __init__(self) -> None:
        self.closed_until: dict[str, float] = {}

    def admission(self, host: str, probe_seconds: float, open_seconds: float) -> Admission:
        until = self.closed_until.get(host)
        return SEND if until is None else Admission(send=False, defer_until=until, reason="circuit open")


counter = Counter[str]()


def works(host: str, count: int) -> list[Work]:
    """count postbacks to host (an address:port, as hosts are counted)."""
    made = []
    for _ in range(count):
        counter[host] += 1
        item = Try(f"{host}-{counter[host]}", 1, 0, "GET", f"http://{host}/p", None)
        made.append(Work(item))
    return made


@pytest.fixture
def config():
    return DeliverySettings()


def engine_with(concurrency: int) -> tuple[Engine, FakeTransport, OpenGate]:
    transport, gate = FakeTransport(), OpenGate()
    return Engine(transport, gate, concurrency, RememberedLimits()), transport, gate


def run(engine: Engine, config: DeliverySettings) -> list[Finished]:
    """One turn: start what may start, take what landed (twice: landings free slots)."""
    finished = engine.step(config, timeout=0)
    finished += engine.step(config, timeout=0)
    return finished


def test_a_new_host_alone_fills_half_the_unproven_share_before_its_first_answer(config):
    engine, transport, _ = engine_with(2000)
    engine.add(works("10.0.0.1:81", 5000), config)

    run(engine, config)

    assert transport.in_flight == unproven_slots(2000) // 2 == 250


def test_a_slow_receiver_alone_has_most_of_the_slots_after_one_round_trip(config):
    """The issue's target, in round trips: a receiver that answers in 1 s reaches 0.8 of the
    worker's slots on its second round trip."""
    engine, transport, _ = engine_with(2000)
    engine.add(works("10.0.0.1:81", 20_000), config)
    in_flight = []
    for _ in range(3):
        run(engine, config)
        in_flight.append(transport.in_flight)
        transport.answer(seconds=1.0)

    assert in_flight[0] == 250
    assert in_flight[1] >= 0.8 * 2000
    assert in_flight[2] == 2000


def test_a_quick_receiver_doubles_its_limit_each_round_trip(config):
    engine, transport, _ = engine_with(1024)
    engine.add(works("10.0.0.1:81", 20_000), config)
    in_flight = []
    for _ in range(5):
        run(engine, config)
        in_flight.append(transport.in_flight)
        transport.answer(seconds=0.01)

    assert in_flight == [128, 256, 512, 1024, 1024]


def test_hosts_that_never_answer_hold_at_most_the_unproven_share_however_many(config):
    engine, transport, _ = engine_with(1024)
    proven = "10.0.0.1:81"
    engine.add(works(proven, 10), config)
    run(engine, config)
    transport.answer(proven)
    run(engine, config)
    transport.answer(proven)  # proven now, and nothing waiting

    for number in range(500):  # a sender inventing hosts: each accepts and never answers
        engine.add(works(f"10.1.{number // 250}.{number % 250}:81", 12), config)
    engine.add(works(proven, 20_000), config)
    for _ in range(20):
        run(engine, config)
        transport.answer(proven)

    stalled = transport.in_flight - transport.in_flight_to(proven)
    assert stalled == unproven_slots(1024) == 256
    run(engine, config)
    assert transport.in_flight_to(proven) == 1024 - 256


def test_one_stalling_host_leaves_half_the_share_to_the_hosts_that_come_after_it(config):
    engine, transport, _ = engine_with(1024)
    engine.add(works("10.0.0.1:81", 1000), config)
    run(engine, config)
    assert transport.in_flight == 128  # half the share

    engine.add(works("10.0.0.2:81", 3), config)
    run(engine, config)

    assert transport.in_flight_to("10.0.0.2:81") == 3


def test_with_the_share_full_a_host_holding_nothing_is_next_in_line(config):
    engine, transport, _ = engine_with(64)  # a share of 16: two hosts' initial requests
    for host in ("10.0.0.1:81", "10.0.0.2:81"):
        engine.add(works(host, 20), config)
    run(engine, config)
    assert transport.in_flight == 16

    engine.add(works("10.0.0.3:81", 1), config)
    run(engine, config)
    assert transport.in_flight_to("10.0.0.3:81") == 0  # the share is full: in line

    transport.answer("10.0.0.1:81", status=None)  # 8 time out: their slots free up
    run(engine, config)

    assert transport.in_flight_to("10.0.0.3:81") == 1


def test_silence_makes_a_proven_host_unproven_and_halves_its_limit(config):
    engine, transport, _ = engine_with(1024)
    host = "10.0.0.1:81"
    engine.add(works(host, 5000), config)
    for _ in range(3):
        run(engine, config)
        transport.answer(seconds=0.01)
    run(engine, config)
    assert transport.in_flight == 1024

    transport.answer(status=None)  # every request times out
    run(engine, config)

    assert transport.in_flight <= INITIAL_IN_FLIGHT  # unproven again, and halved over and over


def test_the_per_host_cap_bounds_a_proven_host_and_zero_means_none_of_its_own(config):
    engine, transport, _ = engine_with(256)
    engine.add(works("10.0.0.1:81", 5000), config)
    config.max_in_flight_per_host = 100
    for _ in range(4):
        run(engine, config)
        transport.answer()
    run(engine, config)
    assert transport.in_flight == 100

    config.max_in_flight_per_host = 0
    for _ in range(3):
        transport.answer()
        run(engine, config)
    assert transport.in_flight == 256


def test_earned_limits_outlive_the_engine_that_earned_them(config):
    remembered = RememberedLimits()
    transport = FakeTransport()
    first = Engine(transport, OpenGate(), 1024, remembered)
    first.add(works("10.0.0.1:81", 2000), config)
    for _ in range(4):
        run(first, config)
        transport.answer()
    run(first, config)
    transport.answer()
    run(first, config)  # everything landed: the host's limit is put away
    assert transport.in_flight == 0

    second = Engine(transport, OpenGate(), 1024, remembered)  # the next drain job
    second.add(works("10.0.0.1:81", 2000), config)
    run(second, config)

    assert transport.in_flight == 1024  # no ramp from the start again


def test_an_open_circuit_defers_its_hosts_postbacks_and_others_go_on(config):
    engine, transport, gate = engine_with(64)
    gate.closed_until["10.0.0.1:81"] = 1234.0
    engine.add(works("10.0.0.1:81", 3), config)
    engine.add(works("10.0.0.2:81", 3), config)

    finished = run(engine, config)

    assert [(f.work.host, f.deferred_until) for f in finished] == [("10.0.0.1:81", 1234.0)] * 3
    assert transport.in_flight_to("10.0.0.2:81") == 3


def test_reconsidering_named_hosts_gives_only_them_another_turn(config):
    engine, transport, gate = engine_with(64)
    gate.closed_until["10.0.0.1:81"] = 0.0  # "hold": its probe is out elsewhere
    engine.add(works("10.0.0.1:81", 2), config)
    run(engine, config)
    assert transport.in_flight == 0

    del gate.closed_until["10.0.0.1:81"]
    engine.reconsider(["10.9.9.9:81"])  # another host: no effect
    run(engine, config)
    assert transport.in_flight == 0

    engine.reconsider(["10.0.0.1:81"])
    run(engine, config)
    assert transport.in_flight == 2


def test_connections_go_to_hosts_in_turn(config):
    engine, transport, _ = engine_with(4)
    for host in ("10.0.0.1:81", "10.0.0.2:81"):
        engine.add(works(host, 10), config)

    run(engine, config)

    assert [request.url for request in transport.started] == [
        "http://10.0.0.1:81/p",
        "http://10.0.0.2:81/p",
        "http://10.0.0.1:81/p",
        "http://10.0.0.2:81/p",
    ]


def test_dropping_what_waits_keeps_what_is_in_flight(config):
    engine, transport, _ = engine_with(4)
    engine.add(works("10.0.0.1:81", 10), config)
    run(engine, config)

    dropped = engine.drop_waiting()

    assert len(dropped) == 6
    assert (engine.waiting, engine.in_flight) == (0, 4)
    transport.answer()
    assert len(run(engine, config)) == 4
    assert not engine.busy


class CountingGate(OpenGate):
    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def admission(self, host: str, probe_seconds: float, open_seconds: float) -> Admission:
        self.asked += 1
        return super().admission(host, probe_seconds, open_seconds)


def test_with_ten_thousand_hosts_waiting_a_landing_costs_one_host_turn(config):
    """Work per step follows what moved, not how many hosts wait: with 10,000 unproven hosts
    in line for the share, one request landing lets one host in, and asks one circuit."""
    transport, gate = FakeTransport(), CountingGate()
    engine = Engine(transport, gate, 64, RememberedLimits())  # a share of 16 slots
    for number in range(10_000):
        engine.add(works(f"10.2.{number // 250}.{number % 250}:81", 1), config)
    run(engine, config)
    assert transport.in_flight == 16

    first = next(iter(transport.out.values())).host
    transport.answer(first, status=None)  # one request lands (a timeout): one slot comes free
    gate.asked = 0
    run(engine, config)

    assert transport.in_flight == 16
    assert gate.asked == 1
