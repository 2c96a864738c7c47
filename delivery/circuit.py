"""Circuit breakers per destination host, shared by every worker through Redis.

After `circuit_failure_threshold` failures or timeouts in a row, a host's circuit opens: its
postbacks are not sent but deferred (put back without using up an attempt) until the circuit
has been open `circuit_open_seconds`. Then one worker sends one postback as a probe; an
answer closes the circuit, a failure opens it again for twice as long (up to 16 times).

Every worker process keeps a copy of which hosts are open or failing, so a healthy host costs
no Redis round trip at all. The copy is brought up to date by each report, and every second
at least, from a feed of changes (`keys.CIRCUITS_CHANGES`: host -> when it last changed): a
refresh costs what changed since the last one, not what is open or failing, so ten thousand
hosts of which thousands are dead cost no more each second than ten. State nobody needs is
forgotten as reports go by: circuits whose time ended long ago without anyone probing them
(nobody had postbacks for the host), and failure counts of hosts not reported on for as long.

Open-until times are on Redis's clock, as every time kept in Redis; a worker compares them with
its estimate of that clock (`delivery.clock.RedisClock`), never with its own wall clock.
"""

import json
import os
import random
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple

from redis import Redis
from redis.client import Pipeline

from delivery.clock import Clock, RedisClock
from delivery.hosts import host_of
from postbackproject import inbox, keys, scripts, shards
from postbackproject.postback import Try
from postbackproject.queue import get_connection

# Longest an open circuit waits, as a multiple of circuit_open_seconds.
MAX_WAIT_FACTOR = 16
# A host's state is forgotten when its circuit's time ended this long ago and nobody probed it,
# or when it is not open and nobody reported on it for this long. Forgetting a dead host costs
# at most `circuit_failure_threshold` requests, once, if postbacks for it come back later.
FORGET_AFTER_MS = 3_600_000
# Stale hosts forgotten per script call, at most: each call does a little of it.
FORGET_PER_CALL = 100
# A worker's copy is refreshed at least this often while it delivers.
REFRESH_SECONDS = 1.0

# What both circuit scripts share. KEYS: open, failures, trips, changes, then per host named
# in ARGV its probe key.
_SHARED = """
local open, failures, trips, changes = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = now_ms()
-- Marks in the feed never go back, even if Redis's clock does: whoever read the feed up to a
-- mark reads every later change by asking from that mark.
local top = redis.call('ZREVRANGE', changes, 0, 0, 'WITHSCORES')
local stamp = math.max(now, tonumber(top[2] or 0))

local function forget(host)
  redis.call('ZREM', open, host)
  redis.call('HDEL', failures, host)
  redis.call('HDEL', trips, host)
  redis.call('ZADD', changes, stamp, host)
end
"""

# Apply what hosts did, forget stale state, and return what changed since the caller last read.
# ARGV: threshold, base wait ms, forget after ms, most forgotten, the caller's mark (0: none),
# then per host: host, answered (1/0), failures since its last answer, probed (1/0).
# Returns {Redis's time ms, the new mark, 1 when the changes are everything else 0,
# {host, open until ms or -1, failures in a row}...}.
_REPORT = (
    _SHARED
    + """
local threshold, base = tonumber(ARGV[1]), tonumber(ARGV[2])
local stale, most, mark = now - tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = 0
for i = 6, #ARGV, 4 do
  n = n + 1
  local host, answered, trailing, probed = ARGV[i], ARGV[i + 1] == '1', tonumber(ARGV[i + 2]), ARGV[i + 3] == '1'
  local probe = KEYS[4 + n]
  if answered then
    redis.call('ZREM', open, host)
    redis.call('HDEL', trips, host)
    redis.call('DEL', probe)
    if trailing > 0 then redis.call('HSET', failures, host, trailing) else redis.call('HDEL', failures, host) end
  elseif trailing > 0 or probed then
    local count = redis.call('HINCRBY', failures, host, trailing)
    local is_open = redis.call('ZSCORE', open, host)
    if probed or (not is_open and count >= threshold) then
      local trip = redis.call('HINCRBY', trips, host, 1)
      local wait = base * math.min(2 ^ (trip - 1), __MAX_FACTOR__)
      redis.call('ZADD', open, now + wait, host)
      redis.call('DEL', probe)
    end
  end
  redis.call('ZADD', changes, stamp, host)
end
for _, host in ipairs(redis.call('ZRANGEBYSCORE', open, '-inf', stale, 'LIMIT', 0, most)) do forget(host) end
for _, host in ipairs(redis.call('ZRANGEBYSCORE', changes, '-inf', stale, 'LIMIT', 0, most)) do
  if redis.call('ZSCORE', open, host) then
    redis.call('ZADD', changes, stamp, host)  -- open longer than that: looked at again later
  elseif redis.call('HEXISTS', failures, host) == 1 or redis.call('HEXISTS', trips, host) == 1 then
    forget(host)
  else
    redis.call('ZREM', changes, host)  -- forgotten long enough ago for every reader to know
  end
end
local everything = mark <= stale
local changed = redis.call('ZRANGEBYSCORE', changes, everything and '-inf' or mark, '+inf')
local found = {}
for _, host in ipairs(changed) do
  found[#found + 1] = host
  found[#found + 1] = tonumber(redis.call('ZSCORE', open, host) or -1)
  found[#found + 1] = tonumber(redis.call('HGET', failures, host) or 0)
end
return {now, stamp, everything and 1 or 0, found}
""".replace("__MAX_FACTOR__", str(MAX_WAIT_FACTOR))
)

# Close circuits by hand: forget the hosts. ARGV: the hosts.
_CLOSE = (
    _SHARED
    + """
for i, host in ipairs(ARGV) do
  forget(host)
  redis.call('DEL', KEYS[4 + i])
end
return #ARGV
"""
)

_STATE_KEYS = [keys.CIRCUITS_OPEN, keys.CIRCUITS_FAILURES, keys.CIRCUITS_TRIPS, keys.CIRCUITS_CHANGES]


@dataclass
class HostReport:
    """What one host did in a batch of finished requests, in the order they finished."""

    answered: bool = False
    failures_since_answer: int = 0
    probed: bool = False

    def add(self, answered: bool) -> None:
        if answered:
            self.answered = True
            self.failures_since_answer = 0
        else:
            self.failures_since_answer += 1


@dataclass(frozen=True)
class Admission:
    """Whether a host's postbacks may go now: send, send one as the probe, or defer."""

    send: bool
    probe: bool = False
    defer_until: float = 0.0  # when not sending: Unix time by Redis's clock
    reason: str = ""


SEND = Admission(send=True)


class Circuits:
    """This process's view of the shared circuits, and its reports to them."""

    def __init__(self, owner: str, connection: Redis, clock: Clock, redis_clock: RedisClock) -> None:
        self.owner = owner
        self.connection = connection
        self.clock = clock
        self.redis_clock = redis_clock
        self._open: dict[str, float] = {}  # host -> open until (Unix seconds, Redis's clock)
        self._failures: dict[str, int] = {}  # host -> failures in a row, as last read
        self._probing: dict[str, float] = {}  # host -> when our probe's claim lapses (monotonic)
        self._mark = 0  # how far the feed of changes has been read
        self._refreshed_at = -REFRESH_SECONDS

    def admission(self, host: str, probe_seconds: float, open_seconds: float) -> Admission:
        """May this host's postbacks be sent now? Acquires the probe when its time has come."""
        until = self._open.get(host)
        if until is None:
            return SEND
        now = self.redis_clock.now()
        if now < until:
            return Admission(send=False, defer_until=self._spread(until, open_seconds), reason=self._why(host, until))
        if self._probing.get(host, -1.0) > self.clock.monotonic():
            return Admission(send=False, defer_until=0.0, reason="")  # hold until the probe answers
        claim_ms = round(probe_seconds * 1000) + 5000
        if self.connection.set(keys.circuit_probe(host), self.owner, nx=True, px=claim_ms):
            self._probing[host] = self.clock.monotonic() + claim_ms / 1000
            return Admission(send=True, probe=True)
        later = now + probe_seconds
        return Admission(send=False, defer_until=self._spread(later, open_seconds), reason=self._why(host, until))

    def failures_in_row(self, host: str) -> int:
        """Failures in a row counted for the host by every worker, as of the last refresh."""
        return self._failures.get(host, 0)

    def needs_report(self, host: str, report: HostReport) -> bool:
        """Healthy hosts are not reported: only failures, and answers that close or reset."""
        return report.failures_since_answer > 0 or report.probed or host in self._failures or host in self._open

    def report(
        self, reports: dict[str, HostReport], threshold: int, open_seconds: float, fresh: bool = False
    ) -> set[str]:
        """Send what hosts did; bring the local view up to date (with nothing to send, only
        every REFRESH_SECONDS, unless asked for a `fresh` view). Returns the hosts whose
        admission may have changed: circuits opened or closed, probes that landed."""
        due = {host: report for host, report in reports.items() if self.needs_report(host, report)}
        if not due and not fresh and self.clock.monotonic() - self._refreshed_at < REFRESH_SECONDS:
            return set()
        args: list[str | int] = [threshold, round(open_seconds * 1000), FORGET_AFTER_MS, FORGET_PER_CALL, self._mark]
        landed = self._lapsed_probes()
        for host, report in due.items():
            args += [host, int(report.answered), report.failures_since_answer, int(report.probed)]
            if report.probed and self._probing.pop(host, None) is not None:
                landed.add(host)
        asked_at = self.redis_clock.asking()
        reply = scripts.run(_REPORT, [*_STATE_KEYS, *map(keys.circuit_probe, due)], args, client=self.connection)
        self.redis_clock.heard(int(reply[0]), asked_at)
        self._refreshed_at = self.clock.monotonic()
        return landed | self._apply(reply)

    def _lapsed_probes(self) -> set[str]:
        """Probes of ours whose claim ran out unanswered (cut off): their hosts may be tried again."""
        now = self.clock.monotonic()
        lapsed = {host for host, claim_ends in self._probing.items() if claim_ends <= now}
        for host in lapsed:
            del self._probing[host]
        return lapsed

    def _apply(self, reply: Sequence[Any]) -> set[str]:
        """Take in the changes read from the feed; returns hosts opened, closed or re-timed."""
        _, mark, everything, found = reply
        self._mark = int(mark)
        rows = [(found[i].decode(), int(found[i + 1]), int(found[i + 2])) for i in range(0, len(found), 3)]
        previous = self._open
        touched = {host for host, _, _ in rows}
        if everything:
            touched |= previous.keys()
            self._open, self._failures = {}, {}
        else:
            previous = {host: previous[host] for host in touched if host in previous}
        for host, until, failures in rows:
            if until >= 0:
                self._open[host] = until / 1000
            else:
                self._open.pop(host, None)
            if failures:
                self._failures[host] = failures
            else:
                self._failures.pop(host, None)
        return {host for host in touched if previous.get(host) != self._open.get(host)}

    def _why(self, host: str, until: float) -> str:
        when = time.strftime("%H:%M:%S", time.gmtime(until))
        return f"circuit open for {host} after failures in a row; next try after {when} UTC"

    @staticmethod
    def _spread(until: float, open_seconds: float) -> float:
        """Deferred postbacks come back spread over a little while, not all at once."""
        return until + random.uniform(0, min(10.0, open_seconds / 4))


@cache
def process_circuits() -> Circuits:
    """The process's view of the circuits, kept across drain jobs (so that each job does not
    read the whole feed again)."""
    clock = Clock()
    connection = get_connection()
    return Circuits(f"{socket.gethostname()}-{os.getpid()}", connection, clock, RedisClock(connection, clock))


class OpenCircuit(NamedTuple):
    """A host's circuit as staff and dashboards see it: open until `until`, then probe due."""

    host: str
    until: float  # Unix time, on Redis's clock
    failures: int  # failures in a row
    # Its open time has passed: the next postback for the host goes out as the probe. It stays
    # so until that probe is answered (closed) or fails (open again), or is forgotten
    # FORGET_AFTER_MS after its time if no postback for the host comes.
    probe_due: bool

    @property
    def state(self) -> str:
        return "probe_due" if self.probe_due else "open"


def open_circuits() -> list[OpenCircuit]:
    """Hosts whose circuit is open or waits for its probe, judged by Redis's clock (as workers
    judge it)."""
    connection = get_connection()
    with connection.pipeline(transaction=False) as pipe:
        pipe.zrange(keys.CIRCUITS_OPEN, 0, -1, withscores=True)
        pipe.time()
        opened, (seconds, micros) = pipe.execute()
    if not opened:
        return []
    now_ms = seconds * 1000 + micros // 1000
    counts: list[bytes | None] = connection.hmget(keys.CIRCUITS_FAILURES, [host for host, _ in opened])  # type: ignore[assignment]
    return [
        OpenCircuit(host.decode(), score / 1000, int(count or 0), probe_due=score <= now_ms)
        for (host, score), count in zip(opened, counts, strict=True)
    ]


# How many circuits are still open and how many wait for their probe, by Redis's clock: two
# counts, whatever the number of hosts.
_COUNT = """
local now = now_ms()
return {redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf'), redis.call('ZCOUNT', KEYS[1], '-inf', now)}
"""


def count_circuits(client: Redis | Pipeline) -> Any:
    """[still open, probe due]; on a pipeline, queued (the counts come with its results)."""
    return scripts.run(_COUNT, [keys.CIRCUITS_OPEN], [], client=client)


def close_circuits(hosts: Iterable[str]) -> int:
    """Close circuits by hand (staff, in admin); their deferred postbacks are due at once.

    Returns how many deferred postbacks were released. Finding them reads every waiting try
    (the due set is keyed by postback, not host): fine for an occasional admin action.
    """
    closing = set(hosts)
    if not closing:
        return 0
    connection = get_connection()
    names = sorted(closing)
    scripts.run(_CLOSE, [*_STATE_KEYS, *map(keys.circuit_probe, names)], names)
    released = 0
    for shard in shards.listed():
        waiting = [
            postback_id
            for postback_id, text in connection.hscan_iter(shard.due_tries, count=1000)
            if host_of(Try.from_fields(json.loads(text)).url) in closing
        ]
        for start in range(0, len(waiting), 1000):
            connection.zadd(shard.due, dict.fromkeys(waiting[start : start + 1000], 0), xx=True)
        released += len(waiting)
    if released:
        inbox.sweep()
    return released
