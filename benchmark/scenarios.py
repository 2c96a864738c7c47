"""The scenarios: what load goes where, how the receivers behave, which delivery settings
apply, and which baselines are measured beside them. `all` is the list in `ALL_ORDER`.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from benchmark.destinations import DestinationSpec, Receivers, StallHosts
from benchmark.receiver import Behaviour
from benchmark.wild import WildHosts, WildOptions

SCENARIOS = ("load", "loop", "flood", "fanout", "slow", "flaky", "stall", "kill", "wild", "stallmany")
# `all`: `load` twice (closed loop for the ingest ratio, open loop at 100/s for end-to-end
# latency); `kill` last, as it leaves a worker dead when the service is not the tool's own.
# `wild` and `stallmany` are left out: each takes minutes (docs/benchmark.md).
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
    schedule: tuple[float, ...] | None = None  # open loop: seconds after the start of each send

    @property
    def mode(self) -> str:
        if self.schedule is not None:
            return "schedule"
        return "open" if self.rate else "closed"

    def describe(self) -> dict[str, Any]:
        return {
            "receiver": self.receiver,
            "objects_per_request": self.objects or 2,
            "shape": "sample" if self.objects is None else f"{self.objects} objects",
            "mode": self.mode,
            "rate": self.rate,
            "clients": None if self.mode != "closed" else self.clients,
            "duration": self.duration,
            "requests": len(self.schedule) if self.schedule is not None else self.requests,
        }


@dataclass(frozen=True)
class Scenario:
    name: str
    phases: tuple[Phase, ...]
    destinations: DestinationSpec = field(default_factory=Receivers)
    together: bool = False  # phases run at once (else one after another)
    # Figures for the postbacks of one phase alone: name -> phase index (e.g. the healthy receiver's).
    groups: Mapping[str, int] = field(default_factory=dict)
    settings: Mapping[str, object] = field(default_factory=dict)
    kill_at: float | None = None  # seconds after the first send
    baselines: tuple[str, ...] = ()  # "healthz", "plain", "rq", "receivers"
    max_wait: float = 120.0  # seconds to wait after the load for every final outcome (--max-wait)
    title: str = ""
    # After the figures: Redis memory a postback waiting, the workers stopped (docs/scaling.md).
    # Only where the receivers answer at once: elsewhere the postbacks sent for it would hold
    # the workers' stop for their grace period.
    waiting_memory: bool = False


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
    wild: WildOptions = field(default_factory=WildOptions)
    stall_hosts: int = 180
    wave_hosts: int = 15
    wave_seconds: float = 10.0
    stall_objects: int = 12
    php_pools: tuple[str, ...] = ()  # the PHP baseline's pools, beside `load` (benchmark/php.py)


def pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def load(options: Options, open_loop: bool = False) -> Scenario:
    rate = pick(options.rate, 100.0 if open_loop else None)
    phase = Phase(
        rate=rate, clients=pick(options.clients, 8), duration=pick(options.duration, 20.0), requests=options.requests
    )
    mode = f"open loop, {rate:g} requests/s" if rate else f"closed loop, {phase.clients} clients"
    closed_baselines = ("healthz", "php") if options.php_pools else ("healthz",)
    return Scenario(
        "load-open" if rate else "load",
        (phase,),
        baselines=() if rate else closed_baselines,
        title=f"the sample, {mode}",
        waiting_memory=True,
    )


def loop(options: Options) -> Scenario:
    phase = Phase(clients=1, duration=pick(options.duration, 60.0), requests=options.requests)
    title = "one client sending the sample again and again"
    return Scenario("loop", (phase,), baselines=("healthz",), title=title, waiting_memory=True)


def flood(options: Options) -> Scenario:
    phase = Phase(
        objects=1,
        clients=pick(options.clients, 16),
        rate=options.rate,
        duration=pick(options.duration, 20.0),
        requests=options.requests,
    )
    title = "single-object requests from many clients"
    return Scenario("flood", (phase,), baselines=("rq",), title=title, waiting_memory=True)


def fanout(options: Options) -> Scenario:
    objects = pick(options.objects, 100)
    phase = Phase(
        objects=objects,
        clients=pick(options.clients, 2),
        rate=options.rate,
        duration=options.duration,
        requests=pick(options.requests, None if options.duration else 40),
    )
    title = f"{objects} data objects a request"
    return Scenario("fanout", (phase,), baselines=("plain",), title=title, waiting_memory=True)


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
    # One receiver is one destination host, under the service's own settings: a host that
    # answers earns the slots it can use (no cap of its own by default), so the ideal is the
    # ceiling, and the run shows how fast a new slow receiver gets there.
    return Scenario(
        "slow",
        (phase,),
        destinations=Receivers({"main": Behaviour(latency_ms=latency)}),
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
        destinations=Receivers({"main": Behaviour(error_rate=error_rate)}),
        settings=retries,
        title=f"receiver answers 503 to {error_rate:.0%} of requests",
    )


def stall(options: Options) -> Scenario:
    """300 postbacks to a receiver that drips its answers, then healthy traffic to another."""
    stall_for = pick(options.stall_for, 30.0)
    stalled = Phase(receiver="stalled", objects=100, clients=1, requests=3)
    healthy = Phase(receiver="healthy", rate=pick(options.rate, 20.0), duration=pick(options.duration, 15.0))
    receivers = Receivers({"stalled": Behaviour(stall=True, stall_for=stall_for), "healthy": Behaviour()})
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
        destinations=receivers,
        groups={"stalled_receiver": 0, "healthy_receiver": 1},
        settings=timeouts,
        title=f"300 postbacks to a receiver stalled for {stall_for:g} s, then a healthy one",
    )


def kill(options: Options) -> Scenario:
    phase = Phase(rate=pick(options.rate, 20.0), duration=pick(options.duration, 15.0), requests=options.requests)
    return Scenario(
        "kill",
        (phase,),
        destinations=Receivers({"main": Behaviour(latency_ms=pick(options.latency_ms, 100.0))}),
        kill_at=5.0,
        title="SIGKILL to a busy worker 5 s in, no replacement",
    )


# `wild`: every postback must reach a final outcome within the wait, those for dead hosts too.
# Retries come soon (the 1 % of 503s); a loopback connection takes microseconds, so 2 s covers a
# TLS handshake under load; reads wait 5 s, above the slowest host's latency (capped at 4 s).
# A dead host's circuit opens after 10 failures and its last tries go out one probe at a time,
# after 1 s, then 2 s (admin's shortest wait): so dead hosts get one request each, not a stream.
WILD_SETTINGS = {
    "max_attempts": 3,
    "backoff_base_seconds": 0.2,
    "backoff_factor": 2,
    "backoff_max_seconds": 1,
    "connect_timeout_seconds": 2,
    "read_timeout_seconds": 5,
    "total_timeout_seconds": 8,
    "circuit_open_seconds": 1,
}
WILD_OBJECTS = 10  # data objects a request (each request goes to one host)
DEAD_HOST_OBJECTS = 4  # x 3 attempts = 12 tries: its circuit opens at the 10th


def wild(options: Options) -> Scenario:
    """Postbacks spread over many hosts, as in the world (benchmark/wild.py)."""
    postbacks_per_second = pick(options.rate, 4000.0)
    objects = pick(options.objects, WILD_OBJECTS)
    live = Phase(
        receiver="live",
        objects=objects,
        rate=postbacks_per_second / objects,
        duration=pick(options.duration, 30.0),
        requests=options.requests,
    )
    world = options.wild
    phases = [live]
    dead = world.refusing_hosts + world.silent_hosts
    if dead:
        phases.append(Phase(receiver="dead", objects=DEAD_HOST_OBJECTS, requests=dead))
    return Scenario(
        "wild",
        tuple(phases),
        destinations=WildHosts(world),
        together=True,
        groups={"dead_hosts": 1} if len(phases) > 1 else {},
        settings=WILD_SETTINGS,
        baselines=("receivers",),
        title=f"{postbacks_per_second:,.0f} postbacks/s over {world.hosts:,} hosts, as in the world",
    )


def waves(hosts: int, per_wave: int, every: float) -> tuple[float, ...]:
    """Send offsets: `per_wave` sends at 0 s, as many `every` seconds later, ... `hosts` in all."""
    return tuple(every * (index // per_wave) for index in range(hosts))


# `stallmany`: the product's default timeouts (a stalled request holds its connection for the
# 10 s read timeout, as it would in production), one try per postback, and circuits that wait
# admin's shortest second: a stalled host's 12 postbacks are final within about a minute.
STALLMANY_SETTINGS = {"max_attempts": 1, "circuit_open_seconds": 1}


def stallmany(options: Options) -> Scenario:
    """Waves of requests to hosts that never answer, beside a steady healthy stream."""
    schedule = waves(options.stall_hosts, options.wave_hosts, options.wave_seconds)
    seconds = options.wave_seconds * math.ceil(options.stall_hosts / max(1, options.wave_hosts))
    stalled = Phase(receiver="stalled", objects=options.stall_objects, schedule=schedule)
    rate, duration = pick(options.rate, 2.0), pick(options.duration, seconds)
    healthy = Phase(receiver="healthy", objects=1, rate=rate, duration=duration)
    return Scenario(
        "stallmany",
        (stalled, healthy),
        destinations=StallHosts(options.stall_hosts),
        together=True,
        groups={"stalled_hosts": 0, "healthy_receiver": 1},
        settings=STALLMANY_SETTINGS,
        # A stalled host's 12 tries hold a connection 10 s each; an engine with 128 connections
        # in all (2 workers x 64) needs about 170 s for 180 hosts' worth, beyond the 2 minutes of waves.
        max_wait=300.0,
        title=(
            f"{options.stall_hosts} hosts that never answer, {options.wave_hosts} more every "
            f"{options.wave_seconds:g} s, beside a healthy receiver"
        ),
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
        "wild": lambda: wild(options),
        "stallmany": lambda: stallmany(options),
    }
    if name == "all":
        # Each scenario keeps its own load shape in `all`: one --duration would not suit them all.
        options = replace(options, rate=None, clients=None, duration=None, requests=None, objects=None)
        return [builders[each]() for each in ALL_ORDER]
    return [builders[name]()]
