"""The delivery engine: which postback goes out next, and when one must wait.

Postbacks wait in one queue per destination host. Free connections go to hosts in turn, each
host within its earned in-flight limit (`hosts.InFlightLimit`) and only while its circuit
lets it (`circuit.Circuits`): a host whose circuit is open has its postbacks deferred at once,
without a request. So a receiver that stalls holds a handful of this worker's connections,
never all of them, and postbacks for every other host keep going out.

The engine does not know where postbacks come from or how results are recorded: callers add
work and take back what finished (sent or deferred) from `step()`.
"""

import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone

from delivery.circuit import Circuits
from delivery.hosts import InFlightLimit, host_of
from delivery.models import DeliverySettings
from delivery.signing import signature_headers
from delivery.transport import Limits, Request, Response, Transport
from postbackproject.postback import Try


@dataclass(eq=False, slots=True)
class Work:
    """One try to make, and whom to tell when it is done."""

    item: Try
    origin: Any = None
    host: str = ""
    probe: bool = False

    def __post_init__(self) -> None:
        if not self.host:
            self.host = host_of(self.item.url)


@dataclass(frozen=True, slots=True)
class Finished:
    """A try that is over for now: sent (`response`) or deferred by its host's circuit."""

    work: Work
    response: Response | None
    deferred_until: float = 0.0  # Unix time, when deferred
    reason: str = ""


def refused_try(work: Work, why: str) -> Finished:
    """A try that must not be sent (its URL cannot be): over at once, failed for good."""
    response = Response(delivered_at=timezone.now(), status=None, elapsed_ms=0.0, error=f"not sent: {why}")
    return Finished(work, response)


# Hosts whose earned in-flight limit is remembered while they have nothing to send.
REMEMBERED_HOSTS = 10_000


@dataclass(slots=True)
class _Host:
    limit: InFlightLimit
    waiting: deque[Work] = field(default_factory=deque)
    in_flight: int = 0
    in_rotation: bool = False


class Engine:
    """Per-host queues in front of one Transport; driven by `step()` from one thread."""

    def __init__(self, transport: Transport, circuits: Circuits, concurrency: int) -> None:
        self.transport = transport
        self.circuits = circuits
        self.concurrency = concurrency
        self._hosts: dict[str, _Host] = {}  # hosts with work waiting or in flight
        self._limits: OrderedDict[str, InFlightLimit] = OrderedDict()  # least recently used first
        self._rotation: deque[str] = deque()  # hosts with waiting work, in turn
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def in_flight(self) -> int:
        return self.transport.in_flight

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self.transport.in_flight)

    def add(self, works: Iterable[Work], config: DeliverySettings) -> None:
        cap = max(1, min(config.max_in_flight_per_host, self.concurrency))
        for work in works:
            host = self._hosts.get(work.host) or self._open_host(work.host)
            host.limit.cap = cap
            host.waiting.append(work)
            self._waiting += 1
            self._enter_rotation(work.host, host)

    def step(self, config: DeliverySettings, timeout: float, start: bool = True) -> list[Finished]:
        """Start what may start (unless not to), wait up to timeout for replies; return what
        finished."""
        finished = self._dispatch(config) if start else []
        if finished or (start and self._can_start_more()):
            timeout = 0.0
        for token, response in self.transport.poll(timeout):
            assert isinstance(token, Work)
            finished.append(self._landed(token, response))
        return finished

    def drop_waiting(self) -> list[Work]:
        """Forget every try not yet started (handing over); returns them."""
        dropped = [work for host in self._hosts.values() for work in host.waiting]
        for name, host in list(self._hosts.items()):
            host.waiting.clear()
            host.in_rotation = False
            self._close_host_if_idle(name, host)
        self._rotation.clear()
        self._waiting = 0
        return dropped

    def _can_start_more(self) -> bool:
        return bool(self._rotation) and self.transport.in_flight < self.concurrency

    def _dispatch(self, config: DeliverySettings) -> list[Finished]:
        """Give free connections to hosts in turn; defer the postbacks of open circuits."""
        finished: list[Finished] = []
        limits = Limits(
            connect_timeout=config.connect_timeout_seconds,
            read_timeout=config.read_timeout_seconds,
            total_timeout=config.total_timeout_seconds,
            body_max_bytes=config.response_body_max_bytes,
        )
        while self._rotation and self.transport.in_flight < self.concurrency:
            name = self._rotation.popleft()
            host = self._hosts[name]
            host.in_rotation = False
            admission = self.circuits.admission(name, config.total_timeout_seconds, config.circuit_open_seconds)
            if not admission.send:
                if admission.defer_until:
                    finished.extend(self._defer_all(host, admission.defer_until, admission.reason))
                    self._close_host_if_idle(name, host)
                # else its probe is out: the host waits for `reconsider()` after the answer
                continue
            if not host.limit.allows(host.in_flight):
                continue  # back in rotation when one of its requests lands
            work = host.waiting.popleft()
            self._waiting -= 1
            work.probe = admission.probe
            self._start(work, host, limits, config.signing_secrets)
            if not admission.probe:
                self._enter_rotation(name, host)
        return finished

    def reconsider(self) -> None:
        """Give every host with waiting work another turn (after circuits changed)."""
        for name, host in self._hosts.items():
            self._enter_rotation(name, host)

    def _start(self, work: Work, host: _Host, limits: Limits, signing_secrets: tuple[str, ...]) -> None:
        item = work.item
        body = item.body.encode() if item.body is not None else None
        headers: tuple[str, ...] = ()
        if signing_secrets:
            # Signed as it leaves: each try carries its own time, and receivers refuse old ones.
            headers = tuple(signature_headers(item.postback_id, int(time.time()), body or b"", signing_secrets))
        request = Request(
            postback_id=item.postback_id,
            attempt=item.attempt,
            method=item.method,
            url=item.url,
            body=body,
            headers=headers,
        )
        host.in_flight += 1
        self.transport.start(request, limits, token=work)

    def _landed(self, work: Work, response: Response) -> Finished:
        host = self._hosts[work.host]
        host.in_flight -= 1
        if response.status is not None:
            host.limit.answered()
        elif response.transient:
            host.limit.went_silent()
        self._enter_rotation(work.host, host)
        self._close_host_if_idle(work.host, host)
        return Finished(work, response)

    def _defer_all(self, host: _Host, until: float, reason: str) -> list[Finished]:
        deferred = [Finished(work, None, deferred_until=until, reason=reason) for work in host.waiting]
        self._waiting -= len(host.waiting)
        host.waiting.clear()
        return deferred

    def _open_host(self, name: str) -> _Host:
        limit = self._limits.pop(name, None) or InFlightLimit(self.concurrency)
        host = self._hosts[name] = _Host(limit)
        return host

    def _close_host_if_idle(self, name: str, host: _Host) -> None:
        """Queues exist only for hosts in use; their earned limits are remembered a while."""
        if host.waiting or host.in_flight:
            return
        del self._hosts[name]
        self._limits[name] = host.limit
        if len(self._limits) > REMEMBERED_HOSTS:
            self._limits.popitem(last=False)

    def _enter_rotation(self, name: str, host: _Host) -> None:
        if host.waiting and not host.in_rotation:
            host.in_rotation = True
            self._rotation.append(name)
