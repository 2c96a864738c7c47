"""Where a scenario's postbacks go, started before the service so that the service can be told
how to reach them: one or a few receivers on 127.0.0.1 (most scenarios), many hosts that stall
(`stallmany`), or a world of hosts over HTTP and HTTPS, by address and by name (`wild`, in
benchmark/wild.py).

A scenario holds a spec (what to start); the runner starts it and its load phases name which
of its destinations they send to (`Phase.receiver`): each send goes to the next URL base of that
name, in turn.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmark.receiver import Behaviour, Listener, Receipt, Receiver
from benchmark.service import ServiceExtras, free_port


@dataclass(frozen=True)
class StartContext:
    workdir: Path  # scratch space for this scenario (certificates, resolv.conf)
    receiver_processes: int | None  # None: the spec's own default
    local_service: bool  # False: a running service, whose workers the tool cannot set up


class Destinations(Protocol):
    """Started receivers, as the runner uses them."""

    def bases(self, name: str) -> list[str]:
        """URL bases (scheme://host:port) of a destination name; sends cycle through them."""
        ...

    def service_extras(self) -> ServiceExtras: ...

    def pids(self) -> dict[str, int]: ...

    def in_flight(self) -> int:
        """Requests received and not yet answered, over every receiver (live)."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def ceiling(self, seconds: float) -> dict[str, float]:
        """What these receivers can answer, measured now (empty: not measured here)."""
        ...

    def stop(self) -> dict[str, list[Receipt]]: ...


class DestinationSpec(Protocol):
    def start(self, context: StartContext) -> Destinations: ...


class StartedReceivers:
    """Receivers by name; each name's URL bases are its listeners'."""

    def __init__(self, receivers: dict[str, Receiver], described: dict[str, Any]) -> None:
        self.receivers = receivers
        self.described = described

    def bases(self, name: str) -> list[str]:
        receiver = self.receivers[name]
        return [receiver.url("", index) for index in range(len(receiver.listeners))]

    def service_extras(self) -> ServiceExtras:
        return ServiceExtras()

    def pids(self) -> dict[str, int]:
        return {
            f"receiver-{name}/{index}": pid
            for name, receiver in self.receivers.items()
            for index, pid in enumerate(receiver.pids)
        }

    def in_flight(self) -> int:
        return sum(receiver.in_flight() for receiver in self.receivers.values())

    def describe(self) -> dict[str, Any]:
        """The receivers' behaviours, and the requests and connections each received."""
        return {
            name: {**self.described[name], "requests": receiver.received(), "connections": receiver.connections()}
            for name, receiver in self.receivers.items()
        }

    def ceiling(self, seconds: float) -> dict[str, float]:
        return {}

    def stop(self) -> dict[str, list[Receipt]]:
        return {name: receiver.stop() for name, receiver in self.receivers.items()}


def start_all(receivers: dict[str, Receiver]) -> None:
    started: list[Receiver] = []
    try:
        for receiver in receivers.values():
            receiver.start()
            started.append(receiver)
    except BaseException:
        for receiver in started:
            receiver.stop()
        raise


@dataclass(frozen=True)
class Receivers:
    """Named receivers on 127.0.0.1, one port each (most scenarios)."""

    behaviours: dict[str, Behaviour] = field(default_factory=lambda: {"main": Behaviour()})

    def start(self, context: StartContext) -> StartedReceivers:
        processes = context.receiver_processes or 1
        receivers = {name: Receiver.single(name, each, free_port(), processes) for name, each in self.items()}
        start_all(receivers)
        return StartedReceivers(receivers, {name: asdict(behaviour) for name, behaviour in self.items()})

    def items(self) -> list[tuple[str, Behaviour]]:
        return list(self.behaviours.items())


STALL_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class StallHosts:
    """`count` hosts (ports of one address) that accept connections and never answer, named
    "stalled" in the order the load should reach them, and one healthy receiver, "healthy"."""

    count: int
    healthy: Behaviour = field(default_factory=Behaviour)

    def start(self, context: StartContext) -> StartedReceivers:
        silent = [Listener(STALL_ADDRESS, 0, Behaviour(silent=True)) for _ in range(self.count)]
        receivers = {
            "stalled": Receiver("stalled", silent, 1),
            "healthy": Receiver.single("healthy", self.healthy, free_port(), context.receiver_processes or 1),
        }
        start_all(receivers)
        described = {"stalled": {"hosts": self.count, "silent": True}, "healthy": asdict(self.healthy)}
        return StartedReceivers(receivers, described)
