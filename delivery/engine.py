"""The delivery engine: which postback goes out next, and when one must wait.

Postbacks wait in one queue per destination host. Free connections go to hosts in turn, each
host within its earned in-flight limit and only while its circuit lets it
(`circuit.Circuits`): a host whose circuit is open has its postbacks deferred at once,
without a request. Hosts that have not answered yet (new, stalling, dead) share a bounded
part of the slots (`hosts.unproven_slots`); with it full they wait in line for one of its
slots, those holding nothing first. So one receiver that stalls holds at most half of that
share, any number of them hold the share, and postbacks for hosts that answer keep going out
(docs/decisions.md, "Fair shares of a worker's slots").

Every step costs in proportion to what moved (requests started and landed, hosts that
changed), never to the number of hosts known or waiting.

The engine does not know where postbacks come from or how results are recorded: callers add
work and take back what finished (sent or deferred) from `step()`.
"""

import enum
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

from django.utils import timezone

from delivery.circuit import Admission, process_circuits
from delivery.destinations import RateLimit, RedisThrottle, Taken
from delivery.hosts import (
    INITIAL_IN_FLIGHT,
    InFlightLimit,
    RememberedLimits,
    host_of,
    process_limits,
    unproven_slots,
)
from delivery.models import DeliverySettings, Destination
from delivery.signing import signature_headers
from delivery.transport import Limits, Request, Response
from postbackproject import tracing
from postbackproject.postback import Try


class Sender(Protocol):
    """What the engine needs of a transport (`delivery.transport.Transport`, or a fake)."""

    @property
    def in_flight(self) -> int: ...

    def start(self, request: Request, limits: Limits, token: object) -> None: ...

    def poll(self, timeout: float) -> list[tuple[object, Response]]: ...

    def abandon(self) -> None: ...


class Throttle(Protocol):
    """What the engine needs of destinations' rate limits (`destinations.RedisThrottle`)."""

    def take(self, limit: RateLimit) -> Taken: ...

    def now(self) -> float: ...


# A paused destination's postbacks are looked at again this often (seconds), so that they go
# out soon after it is resumed. Tries deferred together are due this far apart (seconds), in
# the order they arrived, so that they come back in it.
PAUSED_RECHECK_SECONDS = 2.0
IN_ORDER_SECONDS = 0.001


class Gate(Protocol):
    """What the engine needs of the circuits (`delivery.circuit.Circuits`, or a fake)."""

    def admission(self, host: str, probe_seconds: float, open_seconds: float) -> Admission: ...


@dataclass(eq=False, slots=True)
class Work:
    """One try to make, and whom to tell when it is done."""

    item: Try
    origin: Any = None
    host: str = ""
    probe: bool = False
    unproven: bool = False  # started within the unproven share
    span: Any = None  # the attempt's span while traces are on, from its start to its record
    # The settings it goes by: its destination's rules, or the global settings (`Engine.add`).
    config: DeliverySettings = None  # type: ignore[assignment]  # set as it joins the engine

    def __post_init__(self) -> None:
        if not self.host:
            self.host = host_of(self.item.url)


@dataclass(frozen=True, slots=True)
class Finished:
    """A try that is over for now: sent (`response`) or deferred by its host's circuit."""

    work: Work
    response: Response | None
    deferred_until: float = 0.0  # when deferred: Unix seconds on Redis's clock (delivery.clock)
    reason: str = ""


def refused_try(work: Work, why: str) -> Finished:
    """A try that must not be sent (its URL cannot be): over at once, failed for good."""
    response = Response(delivered_at=timezone.now(), status=None, elapsed_ms=0.0, error=f"not sent: {why}")
    return Finished(work, response)


class Queued(enum.Enum):
    """Where a host with work waiting stands."""

    NO = 0  # not in line: at its limit (back when a request lands) or nothing to send
    ROTATION = 1  # in line for the next free connection
    UNPROVEN = 2  # unproven, in line for a slot of the unproven share


@dataclass(slots=True)
class _Host:
    limit: InFlightLimit
    waiting: deque[Work] = field(default_factory=deque)
    in_flight: int = 0
    queued: Queued = Queued.NO


class Engine:
    """Per-host queues in front of one Transport; driven by `step()` from one thread."""

    def __init__(
        self,
        transport: Sender,
        circuits: Gate,
        concurrency: int,
        remembered: RememberedLimits | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        self.transport = transport
        self.circuits = circuits
        self.throttle = throttle
        self.concurrency = concurrency
        self._remembered = remembered if remembered is not None else process_limits()
        self._hosts: dict[str, _Host] = {}  # hosts with work waiting or in flight
        self._rotation: deque[str] = deque()  # hosts that may send, in turn
        self._waiting = 0
        # The unproven share: its size, the requests it holds, and the hosts in line for one
        # of its slots (entries whose host moved on meanwhile are skipped).
        self._unproven_slots = unproven_slots(concurrency)
        self._unproven_in_flight = 0
        self._unproven_line: deque[str] = deque()

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
        for work in works:
            work.config = config.rules_for(work.host, work.item.url)
            host = self._hosts.get(work.host) or self._open_host(work.host)
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
            host.queued = Queued.NO
            self._close_host_if_idle(name, host)
        self._rotation.clear()
        self._unproven_line.clear()
        self._waiting = 0
        return dropped

    def reconsider(self, hosts: Iterable[str] | None = None) -> None:
        """Give hosts with waiting work another turn (after their circuits changed): the hosts
        named, or every host."""
        names = self._hosts.keys() if hosts is None else hosts
        for name in list(names):
            host = self._hosts.get(name)
            if host is not None:
                self._enter_rotation(name, host)

    def _cap(self, config: DeliverySettings) -> int:
        """Most requests one host may have in flight: the setting (0: no cap of its own), and
        never more than the worker's slots."""
        cap = config.max_in_flight_per_host
        return min(cap, self.concurrency) if cap else self.concurrency

    def _can_start_more(self) -> bool:
        return bool(self._rotation) and self.transport.in_flight < self.concurrency

    def _dispatch(self, config: DeliverySettings) -> list[Finished]:
        """Give free connections to hosts in turn; defer the postbacks of open circuits, paused
        destinations and destinations over their rate limits."""
        finished: list[Finished] = []
        while self._rotation and self.transport.in_flight < self.concurrency:
            name = self._rotation.popleft()
            host = self._hosts[name]
            host.queued = Queued.NO
            if not host.waiting:
                continue
            rules = host.waiting[0].config
            if rules.destination is not None and rules.destination.paused:
                finished.extend(self._defer_paused(name, host, rules.destination))
                continue
            admission = self.circuits.admission(name, config.total_timeout_seconds, config.circuit_open_seconds)
            if not admission.send:
                if admission.defer_until:
                    finished.extend(self._defer_all(host, admission.defer_until, admission.reason))
                    self._close_host_if_idle(name, host)
                # else its probe is out: the host waits for `reconsider()` after the answer
                continue
            if not host.limit.allows(host.in_flight, self._cap(rules)):
                continue  # back in rotation when one of its requests lands
            unproven = not host.limit.proven
            if unproven and not self._unproven_may_send(name, host):
                continue
            if not admission.probe and (held := self._over_rate(name, host, rules)):
                finished.extend(held)
                continue
            work = host.waiting.popleft()
            self._waiting -= 1
            work.probe = admission.probe
            work.unproven = unproven
            self._start(work, host)
            if not admission.probe:
                self._enter_rotation(name, host)
        return finished

    def _unproven_may_send(self, name: str, host: _Host) -> bool:
        """Whether an unproven host may start one more request now: up to INITIAL_IN_FLIGHT
        while the share has room, more only while it is less than half used (else it waits
        for one of its own to land). With the share full it joins the line for a slot, ahead
        of the hosts holding some when it holds none."""
        if host.in_flight >= INITIAL_IN_FLIGHT and 2 * self._unproven_in_flight >= self._unproven_slots:
            return False
        if self._unproven_in_flight < self._unproven_slots:
            return True
        host.queued = Queued.UNPROVEN
        if host.in_flight:
            self._unproven_line.append(name)
        else:
            self._unproven_line.appendleft(name)
        return False

    def _defer_paused(self, name: str, host: _Host, destination: Destination) -> list[Finished]:
        """A paused destination's postbacks wait, in the order they came, without a request."""
        until = self._throttle().now() + PAUSED_RECHECK_SECONDS
        reason = f"{destination.name} is paused"
        return self._defer_destination(name, host, destination, until, IN_ORDER_SECONDS, reason)

    def _over_rate(self, name: str, host: _Host, rules: DeliverySettings) -> list[Finished]:
        """Charge the next request to its destination's rate limit; when the limit refuses,
        its destination's waiting postbacks come back one emission interval apart from when
        the next fits (nothing spent). Empty: send."""
        destination = rules.destination
        limit = destination.rate_limit if destination is not None else None
        if destination is None or limit is None:
            return []
        taken = self._throttle().take(limit)
        if taken.sent:
            return []
        reason = f"{destination.name} is over its rate limit of {limit.per_second:g}/s"
        return self._defer_destination(name, host, destination, taken.fits_at, limit.interval_ms / 1000, reason)

    def _defer_destination(
        self, name: str, host: _Host, destination: Destination, until: float, apart: float, reason: str
    ) -> list[Finished]:
        deferred: list[Finished] = []
        kept: deque[Work] = deque()
        for work in host.waiting:
            if work.config.destination is not None and work.config.destination.pk == destination.pk:
                deferred.append(Finished(work, None, deferred_until=until + apart * len(deferred), reason=reason))
            else:
                kept.append(work)
        host.waiting = kept
        self._waiting -= len(deferred)
        self._enter_rotation(name, host)
        self._close_host_if_idle(name, host)
        return deferred

    def _throttle(self) -> Throttle:
        if self.throttle is None:
            self.throttle = process_throttle()
        return self.throttle

    def _start(self, work: Work, host: _Host) -> None:
        item = work.item
        config = work.config
        body = item.body.encode() if item.body is not None else None
        headers: tuple[str, ...] = ()
        if config.signing_secrets:
            # Signed as it leaves: each try carries its own time, and receivers refuse old ones.
            headers = tuple(signature_headers(item.postback_id, int(time.time()), body or b"", config.signing_secrets))
        # The attempt's span starts as the request leaves; it ends when the try is recorded, at
        # the time the transport measured (`delivery.settling`).
        work.span = tracing.start_attempt(item.traceparent, item.method, work.host, item.attempt, item.postback_id)
        request = Request(
            postback_id=item.postback_id,
            attempt=item.attempt,
            method=item.method,
            url=item.url,
            body=body,
            headers=headers,
            host=work.host,
            sender_headers=item.headers,
            destination_headers=config.destination.header_pairs if config.destination is not None else (),
            traceparent=tracing.traceparent(work.span) if config.send_traceparent else "",
        )
        host.in_flight += 1
        if work.unproven:
            self._unproven_in_flight += 1
        self.transport.start(request, limits_of(config), token=work)

    def _landed(self, work: Work, response: Response) -> Finished:
        host = self._hosts[work.host]
        host.in_flight -= 1
        if response.status is not None:
            host.limit.answered(host.in_flight, self._cap(work.config), response.elapsed_ms / 1000)
        elif response.transient:
            host.limit.went_silent(host.in_flight)
        self._enter_rotation(work.host, host)
        if work.unproven:
            self._unproven_in_flight -= 1
            self._let_next_unproven_in()
        self._close_host_if_idle(work.host, host)
        return Finished(work, response)

    def _let_next_unproven_in(self) -> None:
        """A slot of the unproven share came free: the first host still in line for it goes
        back into rotation."""
        while self._unproven_line:
            name = self._unproven_line.popleft()
            host = self._hosts.get(name)
            if host is not None and host.queued is Queued.UNPROVEN:
                host.queued = Queued.NO
                self._enter_rotation(name, host)
                return

    def _defer_all(self, host: _Host, until: float, reason: str) -> list[Finished]:
        deferred = [Finished(work, None, deferred_until=until, reason=reason) for work in host.waiting]
        self._waiting -= len(host.waiting)
        host.waiting.clear()
        return deferred

    def _open_host(self, name: str) -> _Host:
        host = self._hosts[name] = _Host(self._remembered.take(name))
        return host

    def _close_host_if_idle(self, name: str, host: _Host) -> None:
        """Queues exist only for hosts in use; their earned limits are remembered a while."""
        if host.waiting or host.in_flight:
            return
        del self._hosts[name]
        self._remembered.keep(name, host.limit)

    def _enter_rotation(self, name: str, host: _Host) -> None:
        """Into the line for connections, if it has work and is not in a line already (an
        unproven host in line for a slot of the share stays there unless it has proved
        itself meanwhile)."""
        if not host.waiting or host.queued is Queued.ROTATION:
            return
        if host.queued is Queued.UNPROVEN and not host.limit.proven:
            return
        host.queued = Queued.ROTATION
        self._rotation.append(name)


def limits_of(config: DeliverySettings) -> Limits:
    """How long a request under these settings (its destination's, or the global ones) may take."""
    return Limits(
        connect_timeout=config.connect_timeout_seconds,
        read_timeout=config.read_timeout_seconds,
        total_timeout=config.total_timeout_seconds,
        body_max_bytes=config.response_body_max_bytes,
    )


@cache
def process_throttle() -> RedisThrottle:
    """Destinations' rate limits on the process's Redis client and clock."""
    return RedisThrottle(process_circuits().redis_clock)
