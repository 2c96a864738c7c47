"""The scenarios: what load goes where, how the receivers behave, which delivery settings
apply, and which baselines are measured beside them. `all` is the list in `ALL_ORDER`.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from benchmark.receiver import Behaviour

SCENARIOS = ("load", "loop", "flood", "fanout", "slow", "flaky", "stall", "kill")
# `all`: `load` twice (closed loop for the ingest ratio, open loop at 100/s for end-to-end
# latency); `kill` last, as it leaves a worker dead when the service is not the tool's own.
ALL_ORDER = ("load", "load-open", "loop", "flood", "fanout", "slow", "flaky", "stall", "kill")


@dataclass(frozen=True)
class Phase:
    """One stretch of load: bodies for one receiver, open or closed loop."""

    receiver: str = "main"
    objects: int | None = None  # data objects a request; None: the README's sample (two)
    rate: float | None = None
    clients: int = 1
    duration: float | None = None
    requests: int | None = None

    @property
    def mode(self) -> str:
        return "open" if self.rate else "closed"

    def describe(self) -> dict[str, Any]:
        return {
            "receiver": self.receiver,
            "objects_per_request": self.objects or 2,
            "shape": "sample" if self.objects is None else f"{self.objects} objects",
            "mode": self.mode,
            "rate": self.rate,
            "clients": None if self.rate else self.clients,
            "duration": self.duration,
            "requests": self.requests,
        }


@dataclass(frozen=True)
class Scenario:
    name: str
    phases: tuple[Phase, ...]
    receivers: dict[str, Behaviour] = field(default_factory=lambda: {"main": Behaviour()})
    settings: Mapping[str, object] = field(default_factory=dict)
    kill_at: float | None = None  # seconds after the first send
    baselines: tuple[str, ...] = ()  # "healthz", "plain", "rq"
    title: str = ""


@dataclass(frozen=True)
class Options:
    """The command line, as the scenarios read it (None: the scenario's own default)."""

    rate: float | None = None
    clients: int | None = None
    duration: float | None = None
    requests: int | None = None
    objects: int | None = None
    latency_ms: float | None = None
    error_rate: float | None = None
    stall_for: float | None = None
    workers: int = 2
    concurrency: int = 16


def pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def load(options: Options, open_loop: bool = False) -> Scenario:
    rate = pick(options.rate, 100.0 if open_loop else None)
    phase = Phase(
        rate=rate, clients=pick(options.clients, 8), duration=pick(options.duration, 20.0), requests=options.requests
    )
    mode = f"open loop, {rate:g} requests/s" if rate else f"closed loop, {phase.clients} clients"
    return Scenario(
        "load-open" if rate else "load", (phase,), baselines=() if rate else ("healthz",), title=f"the sample, {mode}"
    )


def loop(options: Options) -> Scenario:
    phase = Phase(clients=1, duration=pick(options.duration, 60.0), requests=options.requests)
    return Scenario("loop", (phase,), baselines=("healthz",), title="one client sending the sample again and again")


def flood(options: Options) -> Scenario:
    phase = Phase(
        objects=1,
        clients=pick(options.clients, 16),
        rate=options.rate,
        duration=pick(options.duration, 20.0),
        requests=options.requests,
    )
    return Scenario("flood", (phase,), baselines=("rq",), title="single-object requests from many clients")


def fanout(options: Options) -> Scenario:
    objects = pick(options.objects, 100)
    phase = Phase(
        objects=objects,
        clients=pick(options.clients, 2),
        rate=options.rate,
        duration=options.duration,
        requests=pick(options.requests, None if options.duration else 40),
    )
    return Scenario("fanout", (phase,), baselines=("plain",), title=f"{objects} data objects a request")


def slow(options: Options) -> Scenario:
    """Offer as many postbacks a second as the workers could have in flight at this latency."""
    latency = pick(options.latency_ms, 100.0)
    objects = pick(options.objects, 10)
    ideal = options.workers * options.concurrency * 1000.0 / latency
    phase = Phase(
        objects=objects,
        rate=pick(options.rate, ideal / objects),
        duration=pick(options.duration, 10.0),
        requests=options.requests,
    )
    # One receiver is one destination host, and a worker keeps at most max_in_flight_per_host
    # (56 by default) of its DELIVERY_CONCURRENCY slots on one host, for isolation: with that cap
    # the ceiling here would be 56/64 of the ideal. The scenario measures how well the slots are
    # used, so it lets the one host have all of them.
    return Scenario(
        "slow",
        (phase,),
        receivers={"main": Behaviour(latency_ms=latency)},
        settings={"max_in_flight_per_host": options.concurrency},
        title=f"receiver answers after {latency:g} ms",
    )


def flaky(options: Options) -> Scenario:
    error_rate = pick(options.error_rate, 0.3)
    phase = Phase(
        rate=pick(options.rate, 50.0),
        clients=pick(options.clients, 1),
        duration=pick(options.duration, 10.0),
        requests=options.requests,
    )
    # Short backoff, so that every retry happens within the run.
    retries = {"max_attempts": 10, "backoff_base_seconds": 0.2, "backoff_factor": 2, "backoff_max_seconds": 2}
    return Scenario(
        "flaky",
        (phase,),
        receivers={"main": Behaviour(error_rate=error_rate)},
        settings=retries,
        title=f"receiver answers 503 to {error_rate:.0%} of requests",
    )


def stall(options: Options) -> Scenario:
    """300 postbacks to a receiver that drips its answers, then healthy traffic to another."""
    stall_for = pick(options.stall_for, 30.0)
    stalled = Phase(receiver="stalled", objects=100, clients=1, requests=3)
    healthy = Phase(receiver="healthy", rate=pick(options.rate, 20.0), duration=pick(options.duration, 15.0))
    receivers = {"stalled": Behaviour(stall=True, stall_for=stall_for), "healthy": Behaviour()}
    # The setting: short timeouts, retries soon enough to end the run after the stall.
    timeouts = {
        "connect_timeout_seconds": 1,
        "read_timeout_seconds": 3,
        "total_timeout_seconds": 5,
        "max_attempts": 20,
        "backoff_base_seconds": 1,
        "backoff_factor": 2,
        "backoff_max_seconds": 5,
    }
    return Scenario(
        "stall",
        (stalled, healthy),
        receivers=receivers,
        settings=timeouts,
        title=f"300 postbacks to a receiver stalled for {stall_for:g} s, then a healthy one",
    )


def kill(options: Options) -> Scenario:
    phase = Phase(rate=pick(options.rate, 20.0), duration=pick(options.duration, 15.0), requests=options.requests)
    return Scenario(
        "kill",
        (phase,),
        receivers={"main": Behaviour(latency_ms=pick(options.latency_ms, 100.0))},
        kill_at=5.0,
        title="SIGKILL to a busy worker 5 s in, no replacement",
    )


def build(name: str, options: Options) -> list[Scenario]:
    builders = {
        "load": lambda: load(options, open_loop=options.rate is not None),
        "load-open": lambda: load(options, open_loop=True),
        "loop": lambda: loop(options),
        "flood": lambda: flood(options),
        "fanout": lambda: fanout(options),
        "slow": lambda: slow(options),
        "flaky": lambda: flaky(options),
        "stall": lambda: stall(options),
        "kill": lambda: kill(options),
    }
    if name == "all":
        # Each scenario keeps its own load shape in `all`: one --duration would not suit them all.
        options = replace(options, rate=None, clients=None, duration=None, requests=None, objects=None)
        return [builders[each]() for each in ALL_ORDER]
    return [builders[name]()]
