"""Destinations: rules for the postbacks to one receiver, matched by host and URL prefix.

A Destination (admin: Delivery > Destinations) names a host (`host[:port]`, as circuits count
it: `hosts.host_of`) and optionally a URL prefix (the path and query the URL starts with). A
postback's destination is the most specific match: the host with the longest prefix the URL
starts with, else the host alone; without one the global settings apply, so receivers nobody
configured need no work.

Workers match without a query: `Routes` is built with the settings they cache
(`DeliverySettings.current()`), a dict by host, each host's rules longest prefix first.

Rate limits are GCRA, as the senders' are (`postbackproject.inbox`): one key per destination
holds, in ms by Redis's clock, when its allowance is whole again; every worker charges it in
one script call per request sent, so all workers together keep within the limit.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from delivery.clock import RedisClock
from postbackproject import keys, scripts
from postbackproject.inbox import gcra_args
from postbackproject.queue import get_many

Rules = TypeVar("Rules")

# Charge one request to a destination's rate limit, or say when one will fit. Marks the
# destination throttled (for the dashboard) for a while after a refusal.
# KEYS: the limit's key, the throttled mark. ARGV: emission interval, tolerance (ms).
# Returns {1, now} (charged) or {0, when the next request fits}, in ms by Redis's clock.
_TAKE = """
local now = now_ms()
local tat, wait = gcra_wait(KEYS[1], now, tonumber(ARGV[2]))
if wait > 0 then
  local fits = math.ceil(now + wait)
  redis.call('SET', KEYS[2], fits, 'PX', fits - now + __THROTTLED_MS__)
  return {0, fits}
end
gcra_charge(KEYS[1], tat + tonumber(ARGV[1]), now)
return {1, now}
""".replace("__THROTTLED_MS__", "2000")


def path_of(url: str) -> str:
    """What follows a URL's authority: its path and query (a prefix is matched against it)."""
    rest = url.partition("://")[2]
    starts = [index for index in (rest.find(stop) for stop in "/?#") if index >= 0]
    return rest[min(starts) :] if starts else ""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `per_second` requests a second, `burst` at once (at least one)."""

    destination_id: int
    per_second: float
    burst: int

    @property
    def interval_ms(self) -> float:
        return 1000 / self.per_second

    def script_args(self) -> tuple[float, float]:
        return gcra_args(self.per_second, self.burst)


@dataclass(frozen=True, slots=True)
class Taken:
    """A rate limit's answer: charged (send now), or not before `fits_at` (Unix seconds by
    Redis's clock)."""

    sent: bool
    fits_at: float


class RedisThrottle:
    """Rate limits shared by every worker, kept in Redis, and Redis's clock they count by."""

    def __init__(self, redis_clock: RedisClock) -> None:
        self.redis_clock = redis_clock

    def now(self) -> float:
        return self.redis_clock.now()

    def take(self, limit: RateLimit) -> Taken:
        names = [keys.destination_rate(limit.destination_id), keys.destination_throttled(limit.destination_id)]
        sent, at_ms = scripts.run(_TAKE, names, limit.script_args())
        return Taken(bool(sent), int(at_ms) / 1000)


def throttled_destinations(ids: Sequence[int]) -> set[int]:
    """Destinations that refused a request over their rate limit a moment ago."""
    if not ids:
        return set()
    marks = get_many([keys.destination_throttled(number) for number in ids])
    return {number for number, mark in zip(ids, marks, strict=True) if mark is not None}


class Routes(Generic[Rules]):
    """Which rules apply to a URL: by host, the longest URL prefix first."""

    def __init__(self, rules: Sequence[tuple[str, str, Rules]] = ()) -> None:
        by_host: dict[str, list[tuple[str, Rules]]] = {}
        for host, prefix, rule in rules:
            by_host.setdefault(host, []).append((prefix, rule))
        self._by_host = {host: sorted(found, key=lambda pair: -len(pair[0])) for host, found in by_host.items()}

    def __bool__(self) -> bool:
        return bool(self._by_host)

    def match(self, host: str, url: str) -> Rules | None:
        """The rules of the most specific destination for this URL (its host already known),
        or None: the global settings apply."""
        found = self._by_host.get(host)
        if not found:
            return None
        path = path_of(url) if found[0][0] else ""
        for prefix, rule in found:
            if path.startswith(prefix):
                return rule
        return None
