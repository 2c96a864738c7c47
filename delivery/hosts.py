"""Destination hosts: what counts as one, and how many requests each may have in flight.

Two rules keep one receiver's trouble its own (docs/decisions.md, "Fair shares of a worker's
slots"):

- A host earns its in-flight limit with answers (`InFlightLimit`). Until it has answered it
  is *unproven*, and so is a host that has gone silent since (a timeout, a refused or failed
  connection).
- Unproven hosts together hold at most the unproven share of a worker's slots
  (`unproven_slots`), so however many names a sender invents, hosts that answer keep the
  rest. Within the share, a host may have INITIAL_IN_FLIGHT requests out, and more only
  while the share is less than half used: a lone new receiver fills its pipe in one round
  trip, and however slowly it answers, it leaves half the share to the hosts that come next.
"""

import math
from collections import OrderedDict
from functools import cache

DEFAULT_PORTS = {"http": ":80", "https": ":443"}
# Requests an unproven host may have in flight while others want the unproven share.
INITIAL_IN_FLIGHT = 8
# The part of a worker's slots that unproven hosts (new, stalling, dead) may hold together.
UNPROVEN_SHARE = 0.25
# A proven host's answer earns one more request in flight per this many seconds it took (at
# least one): a host that answers in 10 ms doubles its limit each round trip, one that
# answers in 1 s grows tenfold, so a slow receiver reaches its share in seconds, not minutes.
EARNING_SECONDS = 0.1
# Hosts whose earned limits a worker remembers while they have nothing to send (least
# recently used forgotten first).
REMEMBERED_HOSTS = 10_000


def host_of(url: str) -> str:
    """The destination a URL names, as limits and circuits count it: `host[:port]`, lower case.

    The port is kept when it is not the scheme's default (two services on one machine are two
    destinations); user info is dropped.
    """
    scheme, _, rest = url.partition("://")
    end = len(rest)
    for stop in "/?#":
        index = rest.find(stop)
        if 0 <= index < end:
            end = index
    authority = rest[:end].rpartition("@")[2].lower()
    default_port = DEFAULT_PORTS.get(scheme.lower())
    if default_port and authority.endswith(default_port):
        authority = authority[: -len(default_port)]
    return authority


def unproven_slots(concurrency: int) -> int:
    """Slots that unproven hosts may hold together in a worker of this concurrency: a quarter,
    and at least room for two hosts' initial requests."""
    return min(concurrency, max(2 * INITIAL_IN_FLIGHT, int(concurrency * UNPROVEN_SHARE)))


class InFlightLimit:
    """How many requests one host may have in flight from this worker: earned, not granted.

    A host that has never answered has no limit of its own: the unproven share bounds it. Its
    first answer proves it, with a limit of what it had in flight then (at least
    INITIAL_IN_FLIGHT); every answer after that earns more, up to the cap: one, or one per
    EARNING_SECONDS the answer took. So the limit at least doubles each round trip while the
    host keeps up, as TCP's slow start does, and grows as fast in seconds for a slow host as
    for a quick one. Silence (a timeout, a failed connection) halves the limit and makes the
    host unproven again until it answers.
    """

    __slots__ = ("limit", "proven")

    def __init__(self) -> None:
        self.limit = math.inf
        self.proven = False

    def allows(self, in_flight: int, cap: int) -> bool:
        return in_flight < min(self.limit, cap)

    def answered(self, in_flight: int, cap: int, seconds: float) -> bool:
        """An answer came after `seconds` (`in_flight` still out); True when it proved the host."""
        if self.proven:
            self.limit = min(float(cap), self.limit + max(1.0, seconds / EARNING_SECONDS))
            return False
        self.proven = True
        self.limit = min(float(cap), max(float(INITIAL_IN_FLIGHT), min(self.limit, in_flight + 1.0)) + 1)
        return True

    def went_silent(self, in_flight: int) -> bool:
        """A request got no answer (`in_flight` still out); True when the host lost its proof."""
        self.limit = max(1.0, min(self.limit, in_flight + 1.0) / 2)
        was_proven, self.proven = self.proven, False
        return was_proven


class RememberedLimits:
    """Earned limits of hosts that have nothing to send now, kept for when they do: per worker
    process, so that a new drain job does not make every host earn its limit again."""

    def __init__(self, size: int = REMEMBERED_HOSTS) -> None:
        self.size = size
        self._limits: OrderedDict[str, InFlightLimit] = OrderedDict()  # least recently used first

    def take(self, host: str) -> InFlightLimit:
        """The host's limit (a new one if forgotten or never seen); it is the caller's now."""
        return self._limits.pop(host, None) or InFlightLimit()

    def keep(self, host: str, limit: InFlightLimit) -> None:
        self._limits[host] = limit
        if len(self._limits) > self.size:
            self._limits.popitem(last=False)

    def clear(self) -> None:
        self._limits.clear()


@cache
def process_limits() -> RememberedLimits:
    """The worker process's remembered limits."""
    return RememberedLimits()
